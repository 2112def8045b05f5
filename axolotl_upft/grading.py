"""Answer extraction and grading for the evaluation protocol: the last ``\\boxed{}`` after any ``<think>``
block vs. gold, by math-verify."""

import math
import os
import re
import threading
from pathlib import Path

from .logs import get_logger

LOG = get_logger(__name__)

BENCHMARKS = {
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
}
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")
_HASHES = re.compile(r"####\s*(.+?)\s*$")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def final_part(text: str) -> str:
    """The text graded: what follows the reasoning block of an R1-style trace (after the last ``</think>``,
    which is there alone when the prompt pre-fills ``<think>``), none of a block left open (cut while
    reasoning), the whole text when there is no block."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1]
    return text.split(_THINK_OPEN, 1)[0]


def _box_contents(text: str, start: int) -> str | None:
    """Text from ``start`` up to the brace closing the box, or None when the box never closes."""
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # \{ and \} are literal braces, not grouping
            continue
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[start:i].strip()
        i += 1
    return None


def _answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = matches[-1].group(1).strip().strip("*").strip()
    if rest.startswith("$"):
        rest = rest.lstrip("$").split("$", 1)[0]
    else:
        rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]
    rest = rest.strip().rstrip(".").strip()
    return rest or None


def extract_answer(text: str) -> str | None:
    """The model's final answer: last ``\\boxed{}``/``\\fbox{}``, else ``#### N``, else "the answer is N",
    read after the reasoning block when there is one (``final_part``).

    A last box that never closes (a truncated generation) counts as no answer.
    """
    text = final_part(text or "")
    if not text:
        return None
    opens = list(_BOX_OPEN.finditer(text))
    bare = list(_BOX_BARE.finditer(text))
    if bare and (not opens or bare[-1].start() > opens[-1].start()):
        return bare[-1].group(1).rstrip(".")
    if opens:
        return _box_contents(text, opens[-1].end()) or None
    lines = text.strip().splitlines()
    hashes = _HASHES.search(lines[-1]) if lines else None
    if hashes:
        return hashes.group(1)
    return _answer_is(text)


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number of ``text`` after its reasoning block (``final_part``), thousands commas dropped, as
    lm-eval-harness's ``flexible-extract``."""
    numbers = _NUMBER.findall(final_part(text or ""))
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer_flexible(text: str) -> str | None:
    """The strict answer (``extract_answer``) when there is one, else the last number of the text."""
    return extract_answer(text) or extract_last_number(text)


def gold_answer(row: dict, benchmark: str | None = None, field: str = "answer") -> str:
    """Gold answer of a row: the text after ``####`` (GSM8K style), else the ``field`` value as text."""
    if row.get(field) in (None, ""):
        raise ValueError(f"row has no {field!r} answer (fields: {sorted(row)}); name the gold's field")
    value = row[field]
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC23 stores 27.0
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    if (benchmark or "").lower() == "gsm8k":
        raise ValueError(f"gsm8k row's {field!r} has no '####' marker: {text[:80]!r}")
    return text


def benchmark_path(name: str, data_dir: str | Path | None = None) -> Path:
    """Resolve a benchmark name (see BENCHMARKS) or a path to a .jsonl file."""
    if name.lower() in BENCHMARKS:
        root = Path(data_dir or os.environ.get("UPFT_DATA_DIR") or DEFAULT_DATA_DIR)
        path = root / BENCHMARKS[name.lower()]
    elif name.endswith(".jsonl"):
        path = Path(name)
    else:
        raise ValueError(
            f"unknown benchmark {name!r}: use one of {sorted(BENCHMARKS)} or a path to a .jsonl file"
        )
    if not path.is_file():
        raise ValueError(
            f"benchmark {name!r}: no file at {path}; pass --data-dir, set UPFT_DATA_DIR to the folder "
            f"holding {BENCHMARKS.get(name.lower(), 'it')}, or give a path to a .jsonl file"
        )
    return path


_UNIT = re.compile(r"\\(?:text|mbox)\{(\s[^{}]*)\}(\^\{?\d\}?)?\s*$")  # a trailing "\text{ cm}^2"
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\,|\{,\})(?=\d{3}(?!\d))")  # 1\,000 and 1{,}000 mean 1,000
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FORMATTING = ("^\\circ", "^{\\circ}", "°", "\\%", "%", "\\$", "$", "\\,", "\\;", "\\ ")
_LOOSE_SPACE = re.compile(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])")  # a space not between two word characters


def _unit(answer: str) -> str:
    """The trailing unit of an answer (``5 \\text{ cm}^2`` -> ``cm^2``), lower case, or ""."""
    found = _UNIT.search(str(answer).strip())
    if not found:
        return ""
    return re.sub(r"\s+", "", found[1]).lower() + re.sub(r"[{}]", "", found[2] or "")


def _same_unit(a: str, b: str) -> bool:
    """No unit on one side, or the same unit up to a plural ending (hour/hours, inch/inches)."""
    if not a or not b:
        return True
    short, long = sorted((a, b), key=len)
    return long in (short, short + "s", short + "es")


def normalize(answer: str) -> str:
    """Canonical text of an answer for a plain string compare; only formatting is removed.

    Nothing that could change the value is deleted: a unit goes only at the end, and removed formatting
    and whitespace leave a space between two letters or digits, so ``1 \\text{ hour } 30`` stays apart
    from ``130`` and ``3 \\text{ or } 5`` from ``35``."""
    s = _UNIT.sub("", str(answer).strip())
    s = _TEXT_WRAP.sub(r"\1", s)
    for old, new in (
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
    ):
        s = s.replace(old, new)
    s = _DIGIT_GROUP_SPACE.sub(",", s)
    for junk in _FORMATTING:
        s = s.replace(junk, " ")
    s = _LOOSE_SPACE.sub("", re.sub(r"\s+", " ", s).strip())
    s = _FRAC_DIGITS.sub(lambda m: "\\frac{" + m[1].strip("{}") + "}{" + m[2].strip("{}") + "}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _boxed(answer: str) -> str:
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def _math_verify(pred: str, gold: str, timeout_s: int | None) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(_boxed(gold), parsing_timeout=timeout_s)
    pred_parsed = parse(_boxed(pred), parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s)


def _math_verify_bounded(pred: str, gold: str, timeout_s: float) -> bool | None:
    """math-verify's verdict, or None when it raised or ran past ``timeout_s``."""
    if threading.current_thread() is threading.main_thread():
        # math-verify bounds each parse/compare step with SIGALRM, which takes whole seconds only.
        return _math_verify(pred, gold, max(1, math.ceil(timeout_s)))
    # SIGALRM works only in the main thread: run without it in a helper thread and stop waiting
    # after timeout_s. A runaway sympy call keeps going in that daemon thread; it cannot be killed.
    verdict: list[bool] = []

    def work():
        try:
            verdict.append(_math_verify(pred, gold, None))
        # An error here would only reach threading's excepthook; no verdict means "use the text compare".
        except Exception as err:  # noqa: BLE001
            LOG.debug("math-verify failed on %r vs gold %r: %r", pred[:80], gold[:80], err)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        LOG.warning("math-verify ran past %.1fs on %r vs gold %r", timeout_s, pred[:80], gold[:80])
        return None
    return verdict[0] if verdict else None


def _timeout_exception() -> type[BaseException]:
    try:
        from math_verify.errors import TimeoutException
    except ImportError as err:
        raise ImportError('grading needs math-verify: pip install "math-verify[antlr4_13_2]"') from err
    return TimeoutException


def is_equivalent(pred: str | None, gold: str, timeout_s: float = 5) -> bool:
    """Whether ``pred`` is mathematically equal to ``gold``.

    Two answers with different trailing units are not equal (math-verify drops units). Equal normalized
    text is equal at once (``normalize`` removes only formatting); everything else is math-verify's
    verdict, and when math-verify fails or runs past the timeout, the answers count as different.
    On the main thread ``timeout_s`` bounds each math-verify step (rounded up to whole seconds);
    elsewhere it bounds the whole check.
    """
    timeout_exception = _timeout_exception()
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold or not _same_unit(_unit(pred), _unit(gold)):
        return False
    if normalize(pred) == normalize(gold):
        return True
    try:
        verdict = _math_verify_bounded(pred, gold, timeout_s)
    # sympy can raise nearly anything on odd input, and one bad answer must not crash an eval run:
    # any failure leaves the text compare's verdict (not equal).
    except (Exception, timeout_exception) as err:  # noqa: BLE001
        LOG.debug("math-verify failed on %r vs gold %r: %r", pred[:80], gold[:80], err)
        verdict = None
    return bool(verdict)


def is_correct(tokenizer, ids: list[int], gold: str) -> bool:
    """Whether generated ids, decoded, hold an answer equivalent to ``gold`` (flexible reading: the strict
    answer, else the last number)."""
    return is_equivalent(extract_answer_flexible(tokenizer.decode(ids, skip_special_tokens=True)), gold)
