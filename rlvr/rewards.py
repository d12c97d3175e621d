"""The multi-signal reward: r = alpha * verify + beta * format + gamma * reflect.

Every signal is scored on the response text only, never on prompt + response, so a prompt that
contains the tags earns nothing. Each signal is a small pure function; `score` returns the parts
with the total so that each part can be logged and each weight swept.

`RewardScorer` scores a batch: format and reflect in this process (linear-time string work), the
math-verify check in a pool of worker processes, each verification under a hard time limit
(a repeating interval timer in the worker's main thread, where signals work, plus a watchdog here
that replaces a pool whose worker is stuck in C code). A response that times out scores verify = 0
and is counted.

What bounds a verification, by path:
- a pool worker: the repeating timer; a single long call into C, which no signal interrupts, is
  bounded by the pool's stall watchdog, which kills the pool and rescores in processes killed on time;
- off the main thread (`score()` from a thread): a process of its own, killed when late;
- in this process on the main thread (`score()`, `RewardScorer(workers=0)`, as the tests' runs
  use): the repeating timer. A single long C call cannot be interrupted there; `too_costly` turns
  away the inputs known to cause one (huge exponents, power towers, long digit runs, deep nesting)
  before any parsing, and the test suite's per-test limit (pytest-timeout) fails a stuck test.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import unicodedata
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch

from rlvr.answers import answer_box, ground_truth_answer, last_boxed, normalize, too_costly, value_part
from rlvr.reflection import DEFAULT_INSTRUCTION, reflection_verdict

DEFAULT_WEIGHTS = (1.0, 0.5, 0.5)
SIGNALS = ("verify", "format", "reflect")

# ---------------------------------------------------------------------------------------------
# Verification (which box, and its normalisation: rlvr.answers)
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
    """Parsed once per process per label: a group of n samples shares one ground truth."""
    from math_verify import parse

    return tuple(parse(f"${answer}$", parsing_timeout=None))


def verify_answer(predicted: str, ground_truth: str) -> bool:
    """math-verify equivalence of a boxed answer and a label, both normalised (rlvr.answers), with
    no time limit of its own; answers too costly to parse are wrong."""
    from math_verify import parse, verify

    if too_costly(predicted):  # before any regex runs over it
        return False
    label = normalize(ground_truth_answer(ground_truth))
    value = value_part(normalize(predicted), label)
    if value is None or not value.strip():
        return False
    gold = list(_parse_gold(label))
    pred = parse(f"${value}$", parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def verify_signal(response: str, ground_truth: str) -> float:
    """1.0 when the answer box (rlvr.answers.answer_box) equals the ground truth, else 0.0 (no time
    limit here)."""
    boxed = answer_box(response)
    if boxed is None or is_blank(boxed):
        return 0.0
    return float(verify_answer(boxed, ground_truth))


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def is_blank(text: str) -> bool:
    """Nothing visible: white space, zero-width and other invisible format characters only."""
    return all(char.isspace() or unicodedata.category(char) in ("Cf", "Cc", "Zs", "Mn") for char in text)


def format_signal(response: str) -> float:
    """1.0 for `<think>X</think> ... \\boxed{Y} ... <reflection>Z</reflection>` + white space.

    Exactly one of each tag, X, Y and Z visible (not blank, zero-width characters are blank), the box
    between `</think>` and `<reflection>`, and nothing but white space after `</reflection>`.
    """
    tags = ("<think>", "</think>", "<reflection>", "</reflection>")
    if any(response.count(tag) != 1 for tag in tags):
        return 0.0
    t_open, t_close, r_open, r_close = (response.index(tag) for tag in tags)
    if not (t_open < t_close < r_open < r_close):
        return 0.0
    think = response[t_open + len("<think>") : t_close]
    middle = response[t_close + len("</think>") : r_open]
    reflection = response[r_open + len("<reflection>") : r_close]
    tail = response[r_close + len("</reflection>") :]
    boxed = last_boxed(middle)
    ok = not is_blank(think) and boxed is not None and not is_blank(boxed) and not is_blank(reflection)
    return 1.0 if ok and is_blank(tail) else 0.0


# ---------------------------------------------------------------------------------------------
# Reflection verdict
# ---------------------------------------------------------------------------------------------

def reflection_text(response: str) -> str | None:
    """The text inside the first `<reflection>...</reflection>` block, or None."""
    start = response.find("<reflection>")
    end = response.find("</reflection>", start + 1)
    if start == -1 or end == -1:
        return None
    return response[start + len("<reflection>") : end]


def reflect_signal(response: str, verify: float, instruction: str = DEFAULT_INSTRUCTION) -> float:
    """1.0 when the reflection gives a clear verdict (rlvr.reflection; `instruction` is the prompt's)
    that agrees with verify, else 0.0. No answer, no reflect: 0.0 when the graded box is missing or
    blank, so "Verdict: wrong" after an empty box earns nothing."""
    text = reflection_text(response)
    if text is None:
        return 0.0
    boxed = answer_box(response)
    if boxed is None or is_blank(boxed):
        return 0.0
    verdict = reflection_verdict(text, instruction)
    if verdict is None:
        return 0.0
    return 1.0 if verdict == (verify == 1.0) else 0.0


# ---------------------------------------------------------------------------------------------
# One response
# ---------------------------------------------------------------------------------------------


def combine(verify: float, fmt: float, reflect: float, weights: Sequence[float]) -> float:
    alpha, beta, gamma = weights
    return alpha * verify + beta * fmt + gamma * reflect


def score(response: str, ground_truth: str, weights: Sequence[float] = DEFAULT_WEIGHTS,
          timeout: float | None = 5.0, instruction: str = DEFAULT_INSTRUCTION) -> dict[str, float]:
    """All signals and the weighted total for one response. Verification gets `timeout` seconds
    (reward.timeout's default; None: unbounded) and scores 0 past it, so no input hangs it;
    `instruction` is the prompt's (a reflection that repeats it gives no verdict)."""
    verify, _ = verify_bounded(response, ground_truth, timeout)
    fmt = format_signal(response)
    reflect = reflect_signal(response, verify, instruction)
    return {"verify": verify, "format": fmt, "reflect": reflect, "total": combine(verify, fmt, reflect, weights)}


def weights_from_env(default: Sequence[float]) -> tuple[float, float, float]:
    """`REWARD_WEIGHTS="a,b,g"` overrides the configured weights, as in the predecessor project."""
    raw = os.environ.get("REWARD_WEIGHTS")
    if not raw:
        return tuple(float(w) for w in default)  # type: ignore[return-value]
    parts = raw.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return tuple(float(p) for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"REWARD_WEIGHTS must be three comma-separated numbers 'alpha,beta,gamma', got {raw!r}")


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0.0 when either side is constant (no linear relation to measure)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


# ---------------------------------------------------------------------------------------------
# Batches, in parallel, with time limits
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardBatch:
    """One tensor per signal, shape (N,), plus how many verifications ran out of time."""

    verify: torch.Tensor
    format: torch.Tensor
    reflect: torch.Tensor
    total: torch.Tensor
    timeouts: int
    overlong: torch.Tensor | None = None  # DAPO's length shaping (`with_overlong`), already in total; None: off

    @property
    def correct(self) -> torch.Tensor:
        """(N,) 1.0 where verify passed: its mean is the accuracy papers report."""
        return (self.verify == 1.0).float()

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.verify) else 0.0


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, sec. 3.4): (N,) response
    lengths in tokens -> (N,) rewards <= 0. Zero up to max_new_tokens - buffer, then falling linearly
    to -penalty at max_new_tokens (a response cut there gets the whole penalty)."""
    start = max_new_tokens - buffer
    return -penalty * ((lengths.float() - start) / buffer).clamp(0.0, 1.0)


def with_overlong(rewards: RewardBatch, lengths: torch.Tensor, max_new_tokens: int, buffer: int,
                  penalty: float) -> RewardBatch:
    """The batch with the overlong signal added to its total: shaping the text scorer cannot do (it
    sees no token counts), and training applies it while evaluation does not."""
    shaped = overlong_penalty(lengths, max_new_tokens, buffer, penalty)
    return dataclasses.replace(rewards, total=rewards.total + shaped, overlong=shaped)


class _Timeout(BaseException):
    """A BaseException, so the `except Exception` inside math-verify and sympy cannot swallow it."""


# After the first deadline the timer fires again every REARM_S until it is disarmed: one alarm whose
# exception is lost (raised inside a finalizer or a garbage-collector callback, where Python reports
# it as "Exception ignored" and drops it, or caught by a bare `except:` in a library) is followed by
# another. A one-shot timer has no second chance, and once hung the test suite (issue 23). A process
# per verification would also be unlosable, but costs a process start per answer on the in-process
# path, which the tests' end-to-end runs use; the repeating timer costs nothing on ordinary answers.
REARM_S = 0.05


class _Alarm:
    """The SIGALRM handler: raises _Timeout while a verification is armed, does nothing after.

    `armed` is cleared by a plain attribute store, where the interpreter runs no signal handler,
    before the timer is stopped, so an alarm that lands once the result is known is a no-op.
    """

    armed = False

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        if self.armed:
            raise _Timeout


_on_alarm = _Alarm()  # one per process, as SIGALRM is


def _die_with(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when the trainer dies, even by SIGKILL, so no worker
    outlives it (and holds its output pipes open)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the trainer died before the request took effect
        os._exit(1)


def _worker_init(parent: int) -> None:
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the trainer decides
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _on_alarm)
    _parse_gold("1")  # import sympy and the parser once, before the first real task


def _verify_limited(response: str, ground_truth: str, timeout: float) -> tuple[float, bool]:
    """verify_signal under the repeating interval timer; runs in a main thread, with `_on_alarm` as
    the SIGALRM handler. -> (score, timed_out)."""
    result = (0.0, True)
    _on_alarm.armed = True
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout, REARM_S)
        result = (verify_signal(response, ground_truth), False)
    except _Timeout:
        pass
    except Exception:  # a parser or sympy failure on odd input is a wrong answer, not a crash
        result = (0.0, False)
    finally:
        _on_alarm.armed = False  # first, with no call before it: see _Alarm
        signal.setitimer(signal.ITIMER_REAL, 0)
    return result


def verify_bounded(response: str, ground_truth: str, timeout: float | None) -> tuple[float, bool]:
    """verify_signal within `timeout` seconds -> (score, timed_out): on the main thread under an
    interval timer, elsewhere (where signals cannot reach) in a process of its own, killed if late."""
    if timeout is None:
        return verify_signal(response, ground_truth), False
    if not _on_main_thread():
        return verify_isolated(response, ground_truth, timeout)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        return _verify_limited(response, ground_truth, timeout)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _verify_chunk(items: list[tuple[str, str]], timeout: float) -> list[tuple[float, bool]]:
    return [_verify_limited(response, truth, timeout) for response, truth in items]


def _isolated(response: str, ground_truth: str, timeout: float, parent: int, out) -> None:
    _worker_init(parent)
    out.send(_verify_limited(response, ground_truth, timeout))


def verify_isolated(response: str, ground_truth: str, timeout: float) -> tuple[float, bool]:
    """One verification in a process of its own, killed if it overruns -> (score, timed_out)."""
    receive, send = WORKER_CONTEXT.Pipe(duplex=False)
    process = WORKER_CONTEXT.Process(target=_isolated, args=(response, ground_truth, timeout, os.getpid(), send),
                                     daemon=True)
    process.start()
    # Start-up (imports) plus the time limit; a process that dies first counts as a timeout.
    ready = mp.connection.wait([receive, process.sentinel], timeout=timeout + 30.0)
    result = receive.recv() if receive in ready and receive.poll() else (0.0, True)
    process.kill()
    process.join()
    return result


class _WorkerProcess(mp.context.SpawnProcess):
    """A spawned process that does not re-run the parent's `__main__` module first.

    Spawn normally re-imports it, and for `python -m rlvr.train` that is all of Lightning: about
    10 s and a few hundred MB per worker. A worker needs only this module, which unpickling its
    task imports anyway.
    """

    @staticmethod
    def _Popen(process_obj):
        main = sys.modules["__main__"]
        saved = {key: main.__dict__.pop(key) for key in ("__spec__", "__file__") if key in main.__dict__}
        main.__spec__ = None  # get_preparation_data reads these two while the process starts
        try:
            return mp.context.SpawnProcess._Popen(process_obj)
        finally:
            del main.__spec__
            main.__dict__.update(saved)


class _WorkerContext(mp.context.SpawnContext):
    Process = _WorkerProcess


WORKER_CONTEXT = _WorkerContext()
STARTUP_S = 300.0  # the longest a new pool is waited for before its first batch; past it, the batch goes on


class RewardScorer:
    """Scores batches of responses; the trainer and the evaluator share it.

    workers=0 verifies in this process (the time limit then needs the main thread); otherwise a
    pool of `workers` spawned processes (default: the machine's cores) does the verification.
    `instruction` is the prompt's, for the reflect signal (rlvr.reflection).
    """

    def __init__(
        self,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        timeout: float = 5.0,
        workers: int | None = None,
        chunk_size: int = 2,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.instruction = instruction
        self.timeout = float(timeout)
        self.workers = (os.cpu_count() or 1) if workers is None else int(workers)
        self.chunk_size = chunk_size
        self._pool: ProcessPoolExecutor | None = None
        self.pool_restarts = 0

    # The pool is not picklable and must not travel with a checkpoint or a deepcopy.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}

    def _get_pool(self) -> ProcessPoolExecutor:
        """The pool, started and waited for: the stall watchdog below must not count a worker's
        start-up (imports, seconds alone, minutes on a loaded machine) as a stuck verification."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, WORKER_CONTEXT, initializer=_worker_init,
                                             initargs=(os.getpid(),))
            wait([self._pool.submit(os.getpid) for _ in range(self.workers)], timeout=STARTUP_S)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        self.pool_restarts += 1

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def verify_many(self, responses: Sequence[str], ground_truths: Sequence[str]) -> tuple[list[float], int]:
        """Verify scores for all responses and the number of timeouts."""
        items = list(zip(responses, ground_truths, strict=True))
        if self.workers == 0:
            results = [verify_bounded(r, t, self.timeout) for r, t in items]
        else:
            results = self._verify_in_pool(items)
        return [s for s, _ in results], sum(t for _, t in results)

    def _verify_in_pool(self, items: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(items)
        chunks = [list(range(i, min(i + self.chunk_size, len(items)))) for i in range(0, len(items), self.chunk_size)]
        pool = self._get_pool()
        pending: dict[Future, list[int]] = {
            pool.submit(_verify_chunk, [items[i] for i in chunk], self.timeout): chunk for chunk in chunks
        }
        # Each worker starts a new chunk only after finishing one, so if nothing completes within
        # a chunk's worst case, every running chunk is past its own timers: a worker is stuck.
        stall = self.timeout * self.chunk_size + 5.0
        while pending:
            done, _ = wait(pending, timeout=stall, return_when=FIRST_COMPLETED)
            if not done:
                self._kill_pool()
                break
            for future in done:
                chunk = pending.pop(future)
                try:
                    for i, result in zip(chunk, future.result()):
                        results[i] = result
                except BrokenProcessPool:  # a worker died (killed, out of memory): rescore below
                    self._kill_pool()
        unfinished = [i for i, r in enumerate(results) if r is None]
        for i in unfinished:
            results[i] = self._verify_isolated(*items[i])
        return results  # type: ignore[return-value]

    def _verify_isolated(self, response: str, ground_truth: str) -> tuple[float, bool]:
        """One response in its own process, killed if it overruns: the slow path after a stall."""
        return verify_isolated(response, ground_truth, self.timeout)

    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str]) -> RewardBatch:
        verify, timeouts = self.verify_many(responses, ground_truths)
        fmt = [format_signal(r) for r in responses]
        reflect = [reflect_signal(r, v, self.instruction) for r, v in zip(responses, verify)]
        total = [combine(v, f, g, self.weights) for v, f, g in zip(verify, fmt, reflect)]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
        return RewardBatch(as_tensor(verify), as_tensor(fmt), as_tensor(reflect), as_tensor(total), timeouts)


def _on_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    timeout: float = 5.0,
    workers: int | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> RewardBatch:
    """Score many responses in parallel with a one-off pool (long runs keep a RewardScorer)."""
    with RewardScorer(weights, timeout, workers, instruction=instruction) as scorer:
        return scorer(responses, ground_truths)
