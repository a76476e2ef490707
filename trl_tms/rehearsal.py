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

from datasets import Dataset

from .data import as_prompt_rows, completion_text
from .history import AdapterHistory
from .trajectories import SamplingParams

REHEARSAL = -2  # `snapshot_step` of a rehearsal answer among the mixture's candidates
INITIAL_STEP = 0  # the initial adapter's step in the rehearsal history

# Everyday prompts for self-rehearsal, written for this project. Disjoint from the forgetting meter's `METER_PROMPTS`
# and from `evaluation.GENERAL_PROMPTS` (the benchmarks' chat probe), so that neither measures forgetting on prompts the
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
