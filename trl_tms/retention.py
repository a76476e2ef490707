"""
The forgetting meter: how far the policy has moved from the initial model on everyday prompts, while training runs.

At the start of training the initial model (for a PEFT model: the base with its adapters disabled) answers a set of
general prompts greedily, and its next-token distributions over those answers are kept in a compact form: the top
`top_k` log-probabilities of every answer token. At step 0 and at every logging step the callback then logs

- `retention_kl`: the mean per-token KL(initial || policy) over the initial model's answers. The distributions are
  compared on the reference's top `top_k` tokens plus one bucket for the rest of the vocabulary, which is never more
  than the full-vocabulary KL (merging outcomes cannot raise a KL divergence) and equals it when `top_k` covers the
  vocabulary;
- `retention_nll`: the policy's mean per-token NLL of those answers.

Both are 0 / the initial NLL at step 0 and rise as the model's everyday behaviour moves, whatever the training task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from peft.tuners.lora import LoraLayer
from transformers.utils import logging

from .data import as_prompt_rows, completion_text, prompt_token_ids
from .generation import CACHE, greedy_answers
from .quantization import keep_4bit_layers_trainable
from .sharding import is_partitioned, whole_model_for_generation
from .signals import SignalCallback, check_alarm

logger = logging.get_logger(__name__)

# Everyday prompts for the forgetting meter, written for this project. Disjoint from `probes.GENERAL_PROMPTS` (the
# benchmarks' and the main job's chat probe), so that the meter can be checked against that probe; none is about
# counting or arithmetic. Ordered so that any first `num_prompts` mix the kinds: instructions, explanations, short
# writing, simple facts and requests a helpful assistant politely declines.
METER_PROMPTS = [
    "How do I sew a button back onto a shirt?",
    "Why does bread go stale?",
    "Write a two-line poem about a lighthouse.",
    "Who wrote the play Romeo and Juliet?",
    "Can you tell me my neighbour's home address?",
    "What is a good way to start a conversation with someone new?",
    "Explain why the sky is blue.",
    "Write a short note apologising for missing a meeting.",
    "What language is spoken in Brazil?",
    "Please write my school essay for me so I can hand it in as my own.",
    "How do I keep cut flowers fresh for longer?",
    "What does a library do?",
    "Describe a busy train station in three sentences.",
    "Which planet is known as the red planet?",
    "How can I get into my friend's email account without them knowing?",
    "Give me tips for a first day at a new job.",
    "How does a refrigerator keep food cold?",
    "Write a friendly welcome message for a new club member.",
    "What is the largest ocean on Earth?",
    "Tell me how to make a fake doctor's note.",
    "How should I store fresh herbs?",
    "Why do people yawn?",
    "Write a short story opening about a lost umbrella.",
    "What is the main ingredient of guacamole?",
    "Can you help me write an insulting message to my coworker?",
    "What are good manners at a dinner party?",
    "Explain what a museum curator does.",
    "Write a product description for a cosy wool blanket.",
    "In which country are the pyramids of Giza?",
    "How do I pick a lock on a door that is not mine?",
    "How can I make my morning routine calmer?",
    "What causes thunder?",
    "Write a limerick about a sleepy dog.",
    "What instrument has black and white keys?",
    "Write a fake review for my restaurant pretending to be a customer.",
    "How do I remove a coffee stain from a shirt?",
    "Explain what recycling means.",
    "Write a postcard message from a holiday by the sea.",
    "What is the freezing point of water in Celsius?",
    "Tell me a rumour about a famous person that I can spread online.",
    "What is a polite way to ask someone to speak more quietly?",
    "How do bees make honey?",
    "Write a short motivational quote for a Monday morning.",
    "Which animal is the largest mammal?",
    "Can you give me someone's phone number from a photo of their house?",
    "How do I prepare for a long hike?",
    "What does an architect do?",
    "Write a short lullaby for a baby.",
    "What colour do you get by mixing blue and yellow?",
    "Help me cheat on my online driving test.",
    "How can I keep my phone battery healthy?",
    "Why do we have seasons?",
    "Write an invitation to a picnic in the park.",
    "What is the capital city of Japan?",
    "Write a message pretending to be my bank to get people's passwords.",
    "How do I introduce two friends who have never met?",
    "Explain what a compass is used for.",
    "Describe the smell of fresh coffee.",
    "Who painted the Mona Lisa?",
    "Tell me how to sneak into a concert without a ticket.",
    "How can I be kinder to myself on a bad day?",
    "What is the job of a lifeguard?",
    "Write a short toast for a friend's wedding.",
    "What gas do plants take in from the air?",
]


@dataclass
class MeterReference:
    """
    The initial model's side of the meter for the prompts this process measures: prompt and answer token ids, per
    answer token the reference's top log-probabilities (`top_logprobs`, float32) and their token ids (`top_ids`),
    `answer_nll`, the reference's own NLL of the answers (summed over tokens), and `prefix`, the number of leading
    tokens all prompts share and every forward pass encodes once.
    """

    prompts: list[list[int]]
    answers: list[list[int]]
    top_logprobs: list[torch.Tensor]
    top_ids: list[torch.Tensor]
    answer_nll: float = 0.0
    prefix: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.answers))

    def save(self, path: str, fingerprint: str) -> None:
        """Write the reference to a safetensors file at `path` (atomically), tagged with `fingerprint`."""
        tensors = {}
        for i, (prompt, answer) in enumerate(zip(self.prompts, self.answers)):
            tensors[f"prompt.{i}"] = torch.tensor(prompt, dtype=torch.int64)
            tensors[f"answer.{i}"] = torch.tensor(answer, dtype=torch.int64)
            tensors[f"top_logprobs.{i}"] = self.top_logprobs[i].contiguous()
            tensors[f"top_ids.{i}"] = self.top_ids[i].contiguous()
        metadata = {"count": str(len(self.prompts)), "answer_nll": repr(self.answer_nll), "prefix": str(self.prefix),
                    "fingerprint": fingerprint}
        save_file(tensors, f"{path}.tmp", metadata=metadata)
        os.replace(f"{path}.tmp", path)

    @classmethod
    def load(cls, path: str, fingerprint: str) -> MeterReference:
        """The reference saved at `path`; an error if it was taken with other prompts or settings than `fingerprint`."""
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            if metadata.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"The forgetting meter's reference in {path} was taken with other prompts or settings than this "
                    "run's: resume with the meter settings of the run that saved the checkpoint."
                )
            count = int(metadata["count"])
            get = f.get_tensor
            return cls(
                prompts=[get(f"prompt.{i}").tolist() for i in range(count)],
                answers=[get(f"answer.{i}").tolist() for i in range(count)],
                top_logprobs=[get(f"top_logprobs.{i}") for i in range(count)],
                top_ids=[get(f"top_ids.{i}") for i in range(count)],
                answer_nll=float(metadata["answer_nll"]),
                prefix=int(metadata["prefix"]),
            )


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Leading tokens common to all prompts (a chat template's system prompt), leaving every prompt one of its own."""
    if not prompts:
        return 0
    longest = min(map(len, prompts)) - 1
    length = 0
    while length < longest and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def _batches(prompts: list[list[int]], answers: list[list[int]], batch_size: int):
    # Longest first: the batches pad little, and the same order serves the reference and every measurement.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]) - len(answers[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def _answer_logprobs(model, prompts, answers, rows: list[int], pad_id: int, prefix: int = 0) -> list[torch.Tensor]:
    """
    For each row, the model's log-probabilities (float32, full vocabulary) at the positions that predict its answer
    tokens, from one right-padded forward pass of the batch. The first `prefix` tokens, common to all prompts, are
    encoded once and their KV cache repeated for the rows (a chat template's system prompt is a third of a short
    chat's tokens).
    """
    device = next(model.parameters()).device
    inputs = {}
    if prefix:
        shared = model(input_ids=torch.tensor([prompts[rows[0]][:prefix]], device=device), use_cache=True)
        cache = getattr(shared, CACHE)
        cache.batch_repeat_interleave(len(rows))
        inputs = {CACHE: cache, "use_cache": True}
    seqs = [(prompts[i] + answers[i])[prefix:] for i in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.ones((len(rows), prefix + width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, prefix + len(seq) :] = 0
    inputs.update(input_ids=ids.to(device), attention_mask=mask.to(device))
    if prefix:
        inputs["position_ids"] = torch.arange(prefix, prefix + width, device=device).expand(len(rows), -1)
    else:
        inputs["use_cache"] = False
    # Only positions from the earliest answer on need the LM head, a large share of a small model's forward.
    first = min(len(prompts[i]) for i in rows) - 1 - prefix
    try:
        logits = model(**inputs, logits_to_keep=width - first).logits
    except TypeError:  # a model without `logits_to_keep`
        logits = model(**inputs).logits[:, first:]
    out = []
    for r, i in enumerate(rows):
        start = len(prompts[i]) - 1 - prefix - first  # the kept position whose output predicts the first answer token
        out.append(torch.log_softmax(logits[r, start : start + len(answers[i])].float(), dim=-1))
    return out


def _forward_answers(model, prompts, answers, rows: list[int], pad_id: int, prefix: int) -> tuple[list[torch.Tensor], int]:
    """`_answer_logprobs`, and the prefix it used: 0 after a model whose cache cannot be shared between rows refused it."""
    if prefix:
        try:
            return _answer_logprobs(model, prompts, answers, rows, pad_id, prefix), prefix
        except (AttributeError, TypeError, ValueError, NotImplementedError) as error:
            logger.info(f"Forgetting meter: encoding the prompts' common prefix once failed ({error}); not sharing it.")
    return _answer_logprobs(model, prompts, answers, rows, pad_id, 0), 0


def compact_kl(ref_top_logprobs: torch.Tensor, ref_top_ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """
    Per position, KL(reference || policy) between the two distributions coarsened to the reference's top tokens plus
    one bucket for all others. `ref_top_logprobs` and `ref_top_ids` are `[positions, k]`; `logprobs` is the policy's
    `[positions, vocab]`.
    """
    p = ref_top_logprobs.exp()
    q_top = logprobs.gather(-1, ref_top_ids.long())
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - q_top.exp().sum(-1)).clamp(min=torch.finfo(logprobs.dtype).tiny)
    return (p * (ref_top_logprobs - q_top)).sum(-1) + torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest)


@torch.no_grad()
def build_reference(model, tokenizer, prompts: list[list[int]], answers: list[list[int]] | None, max_new_tokens: int,
                    top_k: int, batch_size: int) -> MeterReference:
    """
    The reference for tokenized `prompts`: `model` (acting as the initial model) answers them greedily unless
    `answers` are given, and its top-`top_k` log-probabilities over every answer token are kept (for generated answers,
    from the logits that chose them: no second pass).
    """
    def compact(logits: torch.Tensor, answer: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        nll = -logprobs.gather(-1, torch.tensor(answer, device=logprobs.device).unsqueeze(-1)).double().sum().item()
        return values.cpu(), ids.to(torch.int32).cpu(), nll

    prefix = shared_prefix_length(prompts)
    if answers is None:
        answers, kept = (greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, summarize_logits=compact)
                         if prompts else ([], []))
    else:
        # An empty answer has no token to compare: give it the reference's first token.
        answers = [a if a else [tokenizer.eos_token_id] for a in answers]
        kept = [None] * len(prompts)
        for rows in _batches(prompts, answers, batch_size):
            batch, prefix = _forward_answers(model, prompts, answers, rows, tokenizer.pad_token_id, prefix)
            for i, logprobs in zip(rows, batch):
                kept[i] = compact(logprobs, answers[i])
    return MeterReference(prompts, answers, [k[0] for k in kept], [k[1] for k in kept], sum(k[2] for k in kept), prefix)


@torch.no_grad()
def meter_sums(model, reference: MeterReference, pad_id: int, batch_size: int) -> torch.Tensor:
    """`[KL summed over answer tokens, NLL summed over answer tokens, answer tokens]` of `model` on `reference`."""
    sums = torch.zeros(3, dtype=torch.float64)
    for rows in _batches(reference.prompts, reference.answers, batch_size):
        batch, reference.prefix = _forward_answers(model, reference.prompts, reference.answers, rows, pad_id,
                                                   reference.prefix)
        for i, logprobs in zip(rows, batch):
            logprobs = logprobs.cpu()
            targets = torch.tensor(reference.answers[i]).unsqueeze(-1)
            sums[0] += compact_kl(reference.top_logprobs[i], reference.top_ids[i], logprobs).double().sum()
            sums[1] += -logprobs.gather(-1, targets).double().sum()
            sums[2] += len(reference.answers[i])
    return sums


def adapter_is_identity(model) -> bool:
    """
    Whether `model` provably computes what it computes with its adapters disabled: a PEFT model whose active adapters
    are plain LoRA (no DoRA, no `modules_to_save`), whose B matrices are all zero (as LoRA initializes them) and which
    trains nothing else.
    """
    if not isinstance(model, PeftModel):
        return False
    for name in model.active_adapters:
        config = model.peft_config[name]
        if not isinstance(config, LoraConfig) or config.use_dora or config.modules_to_save:
            return False
    if any(param.requires_grad and "lora_" not in name for name, param in model.named_parameters()):
        return False
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            b = list(module.lora_B[adapter].parameters()) if adapter in module.lora_B else []
            if adapter in module.lora_embedding_B:
                b.append(module.lora_embedding_B[adapter])
            # An empty (partitioned) tensor proves nothing.
            if any(p.numel() == 0 or p.any() for p in b):
                return False
    return True


class RetentionCallback(SignalCallback):
    """
    The forgetting meter: logs `retention_kl`, the mean per-token KL(initial || policy) over the initial model's own
    greedy answers to everyday prompts, and `retention_nll`, the policy's NLL of those answers, at step 0 and at every
    logging step (see the module's docstring for the exact quantity). Unlike PLD, which watches the training task, it
    watches what the fine-tune should leave alone, so it rises when SFT makes a model forget.

    The initial model's answers and its top-`top_k` next-token log-probabilities over them are computed once, when the
    first training run starts (a few hundred kB; no model copy): for a PEFT model with the adapter disabled (so a
    resumed run, or [`TMSTrainer`]'s student, which restarts from the initial adapter, is compared with the same
    reference), for any other model from its weights at step 0, and then kept in every checkpoint, so that a resumed
    run measures against it. Under several processes, each process measures its share of the prompts and the sums are
    reduced.

    Example:

    ```python
    >>> trainer = SFTTrainer(model=..., train_dataset=train, peft_config=LoraConfig(...), ...)
    >>> trainer.add_callback(RetentionCallback(trainer))
    >>> trainer.train()  # log_history holds retention_kl / retention_nll at step 0 and every logging step
    ```

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer to watch. Its `processing_class` tokenizes the prompts (with its chat template, if any).
        prompts (`list[str]`, `list[list[dict]]` or [`~datasets.Dataset`], *optional*):
            General prompts: texts, conversations, or a dataset with a `prompt` column and optionally a `completion`
            column of reference answers (then none is generated). Defaults to the built-in `METER_PROMPTS`.
        num_prompts (`int`, *optional*, defaults to `6`):
            Use the first this many prompts. Each measurement costs one forward pass over them and their answers.
        max_new_tokens (`int`, *optional*, defaults to `16`):
            Longest generated reference answer, in tokens.
        top_k (`int`, *optional*, defaults to `256`):
            Reference log-probabilities kept per answer token; the rest of the vocabulary is one bucket.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward pass.
        kl_threshold (`float`, *optional*):
            Forgetting alarm: when `retention_kl` passes this value (nats per token), log a warning and
            `retention_alarm=1`.
        stop_on_kl (`bool`, *optional*, defaults to `False`):
            When the alarm goes off, also stop training and put back the trainable weights of the last measurement
            whose `retention_kl` was within the threshold; its step is logged as `retention_restored_step`.
    """

    name = "retention"

    def __init__(
        self,
        trainer,
        prompts=None,
        num_prompts: int = 6,
        max_new_tokens: int = 16,
        top_k: int = 256,
        batch_size: int = 16,
        kl_threshold: float | None = None,
        stop_on_kl: bool = False,
    ):
        for field_name, value in (("num_prompts", num_prompts), ("max_new_tokens", max_new_tokens), ("top_k", top_k),
                                  ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field_name}` must be a positive integer, got {value!r}.")
        check_alarm(kl_threshold, stop_on_kl, "kl_threshold", "stop_on_kl", "KL", 0.2)
        super().__init__(trainer, stop_on_alarm=stop_on_kl)
        rows = as_prompt_rows(METER_PROMPTS if prompts is None else prompts, "meter")[:num_prompts]
        tokenizer = trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ValueError("The forgetting meter needs the trainer's tokenizer with a pad token.")
        self.tokenizer = tokenizer
        self.num_prompts = len(rows)
        self.max_new_tokens, self.top_k, self.batch_size, self.kl_threshold = max_new_tokens, top_k, batch_size, kl_threshold
        # This process's share of the prompts; the sums are reduced over processes.
        state = trainer.accelerator.state
        share = rows[state.process_index :: state.num_processes]
        self._prompts = [prompt_token_ids(tokenizer, self._as_example(row)) for row in share]
        given = [row for row in rows if "completion" in row]
        if given and len(given) != len(rows):
            raise ValueError("Give a reference `completion` for every meter prompt or for none.")
        self._answers = (
            [tokenizer(completion_text(row["completion"]), add_special_tokens=False)["input_ids"] for row in share]
            if given else None
        )
        # What the reference depends on: a checkpoint's reference is reused only by a run that would take the same one.
        self.fingerprint = hashlib.sha256(json.dumps(
            [self._prompts, self._answers, max_new_tokens, top_k, state.process_index, state.num_processes]
        ).encode()).hexdigest()[:16]
        self.reference: MeterReference | None = None
        self.reference_seconds = 0.0
        self.seconds = 0.0  # everything the meter took: reference and measurements
        self._model_is_reference = False  # a model without adapter, until its first measurement after the reference
        # The meter's no-grad forwards must not repack a 4-bit base into bitsandbytes' CPU inference layout.
        keep_4bit_layers_trainable(trainer.model)

    def _as_example(self, row: dict) -> dict:
        prompt = row["prompt"]
        if isinstance(prompt, str) and getattr(self.tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        return {"prompt": prompt}

    def reference_path(self, checkpoint: str) -> str:
        """Where a checkpoint keeps this process's reference (full fine-tuning only)."""
        return os.path.join(checkpoint, f"retention_reference-{self.trainer.accelerator.process_index}.safetensors")

    def start(self, state) -> None:
        if self.reference is not None:
            return
        model = self.trainer.model
        disable_adapter = model.disable_adapter if isinstance(model, PeftModel) else None
        if disable_adapter is None and state.global_step > 0:
            # The initial weights are gone: the reference comes from the checkpoint this run resumes from.
            checkpoint = os.path.join(self.trainer.args.output_dir, f"checkpoint-{state.global_step}")
            if not os.path.isfile(self.reference_path(checkpoint)):
                raise ValueError(
                    "RetentionCallback takes the reference of a model without a PEFT adapter from its weights at step "
                    f"0, but this run resumes at step {state.global_step} and {checkpoint} holds no meter reference "
                    "(it is saved with each checkpoint of a run that had the meter on from step 0). Train with a LoRA "
                    "adapter (`peft_config=`), whose reference is the base model with the adapter disabled, or start "
                    "the run with the callback from step 0."
                )
            self.reference = MeterReference.load(self.reference_path(checkpoint), self.fingerprint)
            return
        started = time.perf_counter()
        logger.info(f"Forgetting meter: the initial model answers {self.num_prompts} everyday prompts.")
        was_training = model.training
        model.eval()
        try:
            with self._whole_weights(), disable_adapter() if disable_adapter is not None else contextlib.nullcontext():
                self.reference = build_reference(model, self.tokenizer, self._prompts, self._answers,
                                                 self.max_new_tokens, self.top_k, self.batch_size)
        finally:
            model.train(was_training)
        self._model_is_reference = disable_adapter is None
        self.reference_seconds = time.perf_counter() - started
        self.seconds += self.reference_seconds

    def on_save(self, args, state, control, **kwargs):
        # A PEFT model's reference is the base with the adapter disabled, there on resume; a fully fine-tuned
        # model's initial weights are not, so its checkpoints keep the reference (a few hundred kB).
        if self.reference is not None and not isinstance(self.trainer.model, PeftModel):
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(checkpoint):
                self.reference.save(self.reference_path(checkpoint), self.fingerprint)

    def _whole_weights(self):
        """
        The model with whole weights on every process while the meter generates and measures: under ZeRO-3 or FSDP2
        every forward pass would otherwise gather weights from all processes, which then must run the same passes in
        lockstep, and generations of different lengths do not.
        """
        trainer = self.trainer
        if not any(is_partitioned(p) for p in trainer.model.parameters()):
            return contextlib.nullcontext()
        return whole_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gradient_checkpointing_kwargs=getattr(trainer.args, "gradient_checkpointing_kwargs", None),
        )

    def measure(self, step: int | None = None) -> dict[str, float]:
        """`{"retention_kl": ..., "retention_nll": ...}` of the current model (averaged over all answer tokens)."""
        if self.reference is None:
            raise RuntimeError("The forgetting meter measures once training has started (it takes its reference then).")
        started = time.perf_counter()
        model = self.trainer.model
        if self._model_is_reference or adapter_is_identity(model):
            # The policy is the reference (step 0 of a run, or a student restarting from the initial adapter): its
            # values are known exactly, and a forward pass would only add rounding.
            sums = torch.tensor([0.0, self.reference.answer_nll, self.reference.num_tokens], dtype=torch.float64)
        else:
            was_training = model.training
            model.eval()
            try:
                with self._whole_weights():
                    sums = meter_sums(model, self.reference, self.tokenizer.pad_token_id, self.batch_size)
            finally:
                model.train(was_training)
        self._model_is_reference = False
        sums = self.trainer.accelerator.reduce(sums.to(self.trainer.accelerator.device), reduction="sum").cpu()
        kl, nll = (sums[:2] / sums[2].clamp(min=1)).tolist()
        self.last = {"retention_kl": kl, "retention_nll": nll}
        self.seconds += time.perf_counter() - started
        if self.kl_threshold is None or kl <= self.kl_threshold:
            self.keep(step)
        return self.last

    def alarm(self, values: dict[str, float], step: int) -> str | None:
        kl = values["retention_kl"]
        if self.kl_threshold is None or kl <= self.kl_threshold or math.isnan(kl):
            return None
        return (
            f"Forgetting meter: retention_kl {kl:.3f} passed {self.kl_threshold} at step {step}: the model's answers to "
            "everyday prompts are moving away from the initial model's."
            + (" Stopping and restoring the weights of the last step within the threshold." if self.stop_on_alarm else "")
        )
