"""Pure UPFT row building: the structure split, the prefix cut and the loss mask."""

import random
from dataclasses import dataclass

IGNORE_INDEX = -100

PREFIX = "prefix"
FULL = "full"


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]
    kind: str

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def structure_indices(num_questions: int, structure_ratio: float, seed: int) -> frozenset[int]:
    """Indices of the questions that keep their full trace: exactly round(p * n), seeded."""
    count = round(structure_ratio * num_questions)
    return frozenset(random.Random(seed).sample(range(num_questions), count))


def question_kinds(num_questions: int, structure_ratio: float, seed: int) -> list[str]:
    full = structure_indices(num_questions, structure_ratio, seed)
    return [FULL if i in full else PREFIX for i in range(num_questions)]


def cut_prefix(generated: list[int], prefix_length: int, stop_ids: frozenset[int]) -> list[int]:
    """First k generated ids; a stop token inside them ends the prefix (and is kept)."""
    out = []
    for token in generated[:prefix_length]:
        out.append(token)
        if token in stop_ids:
            break
    return out


def cut_at_stop(generated: list[int], stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Generated ids up to and including the first stop token; whether one was reached."""
    for i, token in enumerate(generated):
        if token in stop_ids:
            return generated[: i + 1], True
    return list(generated), False


def build_row(
    prompt_ids: list[int],
    response_ids: list[int],
    kind: str,
    *,
    eos_token_id: int | None = None,
    train_on_inputs: bool = False,
) -> Row:
    """prompt + response (+ EOS when given and not already last); the prompt is masked."""
    response = list(response_ids)
    if eos_token_id is not None and (not response or response[-1] != eos_token_id):
        response.append(eos_token_id)
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Row(list(prompt_ids) + response, prompt_labels + response, kind)


def prefix_row(
    prompt_ids: list[int],
    generated: list[int],
    *,
    prefix_length: int,
    stop_ids: frozenset[int],
    eos_token_id: int | None,
    train_on_inputs: bool = False,
) -> Row:
    """UPFT prefix row: instructed prompt + first k generated ids (+ EOS, inside the loss)."""
    response = cut_prefix(generated, prefix_length, stop_ids)
    if response and response[-1] in stop_ids:
        eos_token_id = None
    return build_row(
        prompt_ids,
        response,
        PREFIX,
        eos_token_id=eos_token_id,
        train_on_inputs=train_on_inputs,
    )


def full_row(
    prompt_ids: list[int], generated: list[int], *, stop_ids: frozenset[int], train_on_inputs: bool = False
) -> Row:
    """UPFT structure row: bare prompt + the whole trace, which ends in its own stop token."""
    response, _ = cut_at_stop(generated, stop_ids)
    return build_row(prompt_ids, response, FULL, train_on_inputs=train_on_inputs)
