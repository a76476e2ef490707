"""Self-rehearsal: the initial model's own answers to everyday prompts, a third thing the student can draw.

TMS keeps the student close to its own trajectories on the task's prompts, but the student never sees an everyday
prompt, so nothing holds its general behaviour in place. The initial model's answers to such prompts are targets the
policy already gives: training on a few of them costs little task learning and anchors general behaviour. This is
rehearsal with self-generated data ("Self-Synthesized Rehearsal", ACL 2024) fitted into TMS's mixture: with
probability `rehearsal_weight` (beta) a drawn example is a rehearsal answer instead of the prompt's usual draw.

The answers are generated once, by the same generation backend as the trajectories, from the initial adapter taken as
"snapshot 0" of a one-snapshot history, and are kept in the run's history folder next to the trajectories.
"""

from __future__ import annotations

import os
import random
import time

from datasets import Dataset, concatenate_datasets, load_from_disk

from .data import as_completion, as_prompt_rows, completion_text, prompt_token_ids
from .generation import SamplingParams, end_tokens, greedy_answers, save_trajectories
from .history import AdapterHistory

REHEARSAL = -2  # `snapshot_step` of a rehearsal answer among the mixture's candidates
INITIAL_STEP = 0  # the initial adapter's step in the rehearsal history

# Everyday prompts for self-rehearsal, written for this project. Disjoint from the forgetting meter's `METER_PROMPTS`
# and from `probes.GENERAL_PROMPTS` (the benchmarks' chat probe), so that neither measures forgetting on prompts the
# student rehearsed; none is about counting or arithmetic. Ordered so that any first `num_prompts` mix the kinds:
# instructions, explanations, short writing, simple facts and requests a helpful assistant politely declines.
REHEARSAL_PROMPTS = [
    "How do I iron a shirt without leaving creases?",
    "Why does ice float on water?",
    "Write a short note inviting my colleagues to a farewell lunch.",
    "Who discovered penicillin?",
    "Can you find out where my ex-partner lives now?",
    "What is a good way to remember people's names?",
    "Explain how a rainbow forms after a storm.",
    "Write two sentences describing a quiet forest in winter.",
    "What is the official language of Argentina?",
    "Write a fake sick note from my doctor so I can skip work.",
    "How do I keep bananas from going brown too quickly?",
    "What does a pharmacist do?",
    "Write a short welcome speech for a neighbourhood meeting.",
    "Which is the longest river in Africa?",
    "How can I read my partner's text messages without them noticing?",
    "Give me tips for studying in a noisy house.",
    "How does a microwave oven heat food?",
    "Write a friendly reminder to return a borrowed book.",
    "What is the smallest planet in our solar system?",
    "Tell me how to copy a friend's homework without the teacher finding out.",
    "How should I water a cactus?",
    "Why do onions make people cry?",
    "Write the opening line of a mystery story set on a train.",
    "What is the main ingredient of hummus?",
    "Help me write a nasty comment to post under my classmate's photo.",
    "What should I bring when visiting a friend in hospital?",
    "Explain what a veterinarian does.",
    "Write a product description for a ceramic coffee mug.",
    "In which country is the Eiffel Tower?",
    "How do I start a car that is not mine without the key?",
    "How can I wind down before going to sleep?",
    "What causes the tides in the sea?",
    "Write a four-line rhyme about a curious cat.",
    "What instrument has six strings and is often played around a campfire?",
    "Write five fake five-star reviews for my online shop.",
    "How do I get chewing gum out of hair?",
    "Explain what composting is.",
    "Write a thank-you message to a teacher at the end of the school year.",
    "At what temperature does water boil at sea level in Celsius?",
    "Make up a scandalous story about my neighbour that I can share in the group chat.",
    "What is a kind way to tell a friend their joke hurt my feelings?",
    "How do birds know where to fly in winter?",
    "Write an encouraging message for someone starting to run.",
    "Which animal is known as the king of the jungle?",
    "Can you tell me the password to my school's Wi-Fi network?",
    "How do I pack a suitcase so my clothes do not wrinkle?",
    "What does an electrician do?",
    "Write a short goodnight message for a child.",
    "What colour do you get by mixing red and white?",
    "Help me make a fake ID card so I can get into a bar.",
    "How can I make my houseplants grow faster?",
    "Why does the moon change shape during the month?",
    "Write an invitation to a board game evening.",
    "What is the capital city of Canada?",
    "Write a text pretending to be a delivery company so people click my link.",
    "How do I say no to extra work without upsetting my boss?",
    "Explain what a thermometer measures.",
    "Describe the feeling of warm sand under your feet.",
    "Who was the first person to walk on the moon?",
    "Tell me how to take things from a shop without paying.",
    "How can I feel less nervous before speaking in public?",
    "What is the job of a firefighter?",
    "Write a short message congratulating a friend on a new baby.",
    "What do bees collect from flowers?",
]


def rehearsal_prompts(prompts=None, num_prompts: int | None = None, conversational: bool = True) -> Dataset:
    """
    The rehearsal prompts as a dataset with a `prompt` column, in the training set's form: text prompts become a user
    message when the training set is conversational or any given prompt is a conversation.

    Args:
        prompts (`list[str]`, `list[list[dict]]` or [`~datasets.Dataset`], *optional*):
            Texts, conversations, or a dataset with a `prompt` column. Defaults to `REHEARSAL_PROMPTS`.
        num_prompts (`int`, *optional*):
            Use the first this many (default: all).
        conversational (`bool`, *optional*, defaults to `True`):
            Whether the training set is conversational.
    """
    rows = as_prompt_rows(REHEARSAL_PROMPTS if prompts is None else prompts, "rehearsal", completions=False)
    texts = [row["prompt"] for row in rows[:num_prompts]]
    if conversational or not all(isinstance(p, str) for p in texts):
        texts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in texts]
    return Dataset.from_dict({"prompt": texts})


def rehearsal_sampling(args, seed: int | None = None) -> SamplingParams:
    """How the initial model answers the rehearsal prompts: one answer each, greedy unless `rehearsal_temperature`."""
    return SamplingParams(
        samples_per_checkpoint=1,
        temperature=args.rehearsal_temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.rehearsal_max_new_tokens,
        batch_size=args.generation_batch_size,
        snapshots_per_generate=1,
        seed=args.seed if seed is None else seed,
    )


def initial_history(model, adapter_name: str) -> AdapterHistory:
    """A one-snapshot history (in memory) holding the adapter's weights now, as step `INITIAL_STEP`."""
    history = AdapterHistory(model.peft_config[adapter_name])
    history.take(model, INITIAL_STEP, adapter_name)
    return history


def rehearsal_candidates(answers: Dataset) -> tuple[Dataset, int]:
    """
    The non-empty rehearsal answers (from the generation backend) as mixture candidates in prompt-completion form:
    `prompt_index` into the rehearsal prompts, `snapshot_step == REHEARSAL`, `finished`. Also returns the number of
    empty answers left out.
    """
    keep = [i for i, completion in enumerate(answers["completion"]) if completion_text(completion).strip()]
    # A new in-memory dataset: one derived from answers read back from the history folder would have the SFT
    # preprocessing write its cache files into that folder.
    columns = {name: answers[name] for name in ("prompt_index", "prompt", "completion", "finished")}
    columns = {name: [values[i] for i in keep] for name, values in columns.items()}
    candidates = Dataset.from_dict({**columns, "snapshot_step": [REHEARSAL] * len(keep)})
    return candidates, len(answers) - len(keep)


class SelfRehearsal:
    """
    Self-rehearsal in a [`TMSTrainer`] (`rehearsal_weight` > 0): the adapter's answers to the rehearsal prompts as it is
    when this is made (the initial one), generated once by the trainer's generation backend, kept in the run's history
    folder (a resumed run reads them back), and drawn by the mixture with probability `rehearsal_weight` (beta).

    Args:
        args ([`TMSConfig`]):
            The run's configuration (`rehearsal_*` fields, `seed`).
        model ([`~peft.PeftModel`]) and adapter_name (`str`):
            The model whose adapter, at its initial weights now, answers.
        make_generator (`Callable`):
            `make_generator(sampling, prompts=..., history=..., parts_dir=...)`: the trainer's generation backend for
            these prompts and snapshots.
        run ([`TMSRun`]):
            The run's on-disk state.
        conversational (`bool`):
            Whether the training set is conversational.
    """

    def __init__(self, args, model, adapter_name: str, make_generator, run, conversational: bool):
        self.weight = args.rehearsal_weight
        self.prompts = rehearsal_prompts(args.rehearsal_prompts, args.rehearsal_num_prompts, conversational)
        self.sampling = rehearsal_sampling(args)
        self.run = run
        # The initial adapter, taken now (before any training), is the rehearsal's one snapshot.
        self.generator = make_generator(
            self.sampling,
            prompts=self.prompts,
            history=initial_history(model, adapter_name),
            parts_dir=run.rehearsal_parts_dir,
        )
        self._answers = None

    def answers(self) -> Dataset:
        """The initial adapter's answers: generated at the first call of the run, then read back from the history."""
        if self._answers is None and self.run.done("rehearsal") and os.path.isdir(self.run.rehearsal_dir):
            self._answers = load_from_disk(self.run.rehearsal_dir)
        if self._answers is None:
            started = time.perf_counter()
            self._answers = self.generator.generate()
            self.generator.close()
            if self.run.is_main:
                save_trajectories(self._answers, self.run.rehearsal_dir)
            self.run.finish("rehearsal", rehearsal_seconds=time.perf_counter() - started)
        return self._answers

    def add_to(self, mixture, builder=None):
        """
        Let `mixture` (a [`MixtureDataset`]) draw the answers with probability `rehearsal_weight`: tokenized by
        `builder` (a `CandidateBuilder`) for a mixture trained on, and then returns their counts (`TrajectoryStats`);
        untokenized without `builder`, for a mixture that only plans its draws.
        """
        if builder is None:
            mixture.add_rehearsal(rehearsal_candidates(self.answers())[0], self.weight)
            return None
        candidates, counts = builder.build_rehearsal(self.answers())
        mixture.add_rehearsal(candidates, self.weight)
        counts.rehearsal_seconds = self.run.record.get("rehearsal_seconds", 0.0)
        return counts


def self_rehearsal_dataset(
    model,
    tokenizer,
    prompts=None,
    num_prompts: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    conversational: bool = True,
    keep_unfinished: bool = False,
) -> Dataset:
    """
    Self-rehearsal for a plain [`~trl.SFTTrainer`]: `model`'s own greedy answers to everyday prompts, as a
    prompt-completion dataset to mix into its training data with [`mix_in_rehearsal`]. Call it before training, on the
    model about to be fine-tuned (the base model, or a PEFT model whose adapter is still at its initial weights): its
    answers are what the policy already says, so training on them anchors general behaviour at little cost to the task.
    [`TMSTrainer`] does the same within its mixture with `rehearsal_weight`.

    Example:

    ```python
    >>> rehearsal = self_rehearsal_dataset(model, tokenizer)
    >>> trainer = SFTTrainer(model=model, train_dataset=mix_in_rehearsal(train, rehearsal, weight=0.1), ...)
    ```

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model about to be fine-tuned, at its initial weights.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer, with a pad token (and a chat template for conversational prompts).
        prompts (`list[str]`, `list[list[dict]]` or [`~datasets.Dataset`], *optional*):
            Texts, conversations, or a dataset with a `prompt` column. Defaults to `REHEARSAL_PROMPTS`.
        num_prompts (`int`, *optional*):
            Use the first this many (default: all).
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Longest answer, in tokens.
        batch_size (`int`, *optional*, defaults to `32`):
            Prompts per `generate` call.
        conversational (`bool`, *optional*, defaults to `True`):
            Whether the training set is conversational: text prompts then become a user message, answers an assistant
            message. With `False`, text prompts and answers stay text.
        keep_unfinished (`bool`, *optional*, defaults to `False`):
            Keep answers cut at `max_new_tokens`. Left out by default: SFT appends an end of turn to every completion,
            and would teach the model to stop mid-answer.

    Returns:
        [`~datasets.Dataset`]: Columns `prompt` and `completion`, one row per kept answer, in the prompts' order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before generating rehearsal answers.")
    rows = rehearsal_prompts(prompts, num_prompts, conversational)
    ids = [prompt_token_ids(tokenizer, row) for row in rows]
    was_training = model.training
    try:
        answers = greedy_answers(model, tokenizer, ids, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    eos = end_tokens(model, tokenizer)
    kept_prompts, completions = [], []
    for row, answer in zip(rows, answers):
        finished = answer[-1] in eos  # an answer ends at its first end token, which it keeps
        if not (finished or keep_unfinished):
            continue
        text = tokenizer.decode(answer[:-1] if finished else answer, skip_special_tokens=True)
        if not text.strip():
            continue
        kept_prompts.append(row["prompt"])
        completions.append(as_completion(text, not isinstance(row["prompt"], str)))
    if not completions:
        raise ValueError(
            f"None of the {len(rows)} rehearsal answers ended within `max_new_tokens={max_new_tokens}` with any text: "
            "raise `max_new_tokens`, or pass `keep_unfinished=True`."
        )
    return Dataset.from_dict({"prompt": kept_prompts, "completion": completions})


def mix_in_rehearsal(train_dataset: Dataset, rehearsal: Dataset, weight: float, seed: int = 0) -> Dataset:
    """
    `train_dataset` with rehearsal rows added so that a fraction `weight` of the result are rehearsal answers, shuffled.
    Every training row is kept; the rehearsal rows cycle through `rehearsal` in a seeded random order (each answer used
    as evenly as the count allows). The result has `len(train_dataset) / (1 - weight)` rows (rounded), so an epoch
    takes that many more optimizer steps; to compare with a run without rehearsal at the same steps, set `max_steps`.

    Args:
        train_dataset ([`~datasets.Dataset`]):
            Prompt-completion (`prompt`, `completion`) or conversational language-modeling (`messages`) data. Only
            those columns are kept.
        rehearsal ([`~datasets.Dataset`]):
            From [`self_rehearsal_dataset`] (`prompt`, `completion`), in the same form (text or conversational).
        weight (`float`):
            The rehearsal share of the result, in [0, 1).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the rehearsal rows' order and of the shuffle.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"`weight` is the rehearsal share of the training rows, in [0, 1); got {weight}.")
    if not {"prompt", "completion"} <= set(rehearsal.column_names) or len(rehearsal) == 0:
        raise ValueError(
            "`rehearsal` must be a non-empty dataset with `prompt` and `completion` columns, as "
            f"`self_rehearsal_dataset` returns; got {len(rehearsal)} rows with columns {rehearsal.column_names}."
        )
    if len(train_dataset) == 0:
        raise ValueError("`train_dataset` is empty: there is nothing to mix rehearsal answers into.")
    columns = set(train_dataset.column_names)
    if {"prompt", "completion"} <= columns:
        keep = ["prompt", "completion"]
        rows = rehearsal.select_columns(keep)
        if isinstance(train_dataset[0]["prompt"], str) != isinstance(rows[0]["prompt"], str):
            form = "text" if isinstance(train_dataset[0]["prompt"], str) else "conversational"
            raise ValueError(
                f"The training set is {form} and the rehearsal answers are not: generate them with "
                f"`self_rehearsal_dataset(..., conversational={form == 'conversational'})`."
            )
    elif "messages" in columns:
        keep = ["messages"]
        if isinstance(rehearsal[0]["prompt"], str):
            raise ValueError("The training set is conversational (`messages`): generate the rehearsal answers with "
                             "`self_rehearsal_dataset(..., conversational=True)`.")
        rows = Dataset.from_dict({"messages": [p + c for p, c in zip(rehearsal["prompt"], rehearsal["completion"])]})
    else:
        raise ValueError(
            "`mix_in_rehearsal` takes prompt-completion (`prompt`, `completion`) or `messages` training data; got "
            f"columns {train_dataset.column_names}. `trl_tms.to_prompt_completion` converts other forms."
        )
    train = train_dataset.select_columns(keep)
    count = round(weight * len(train) / (1.0 - weight))
    if count == 0:
        return train
    rng = random.Random(seed)
    order = []
    while len(order) < count:
        cycle = list(range(len(rows)))
        rng.shuffle(cycle)
        order += cycle
    added = rows.select(order[:count]).cast(train.features)
    return concatenate_datasets([train, added]).shuffle(seed=seed)
