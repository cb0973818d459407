"""The chat model in a process of its own, on a tiny random Llama with real LoRA adapters: streaming,
compare, adapter switching, 20 concurrent callers, a killed child, and unload really ending the process."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from studio.services.chat import BASE, GenerationSettings
from studio.services.chatproc import ChatError, ChatProcess
from tests.conftest import kill_tree

pytestmark = pytest.mark.integration

# A random tiny model repeats its last token forever; a strong repetition penalty makes it say words.
SHORT = GenerationSettings(max_new_tokens=12, repetition_penalty=3.0)
LONGER = GenerationSettings(max_new_tokens=16, repetition_penalty=3.0)
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA whose weights are random, not zero, so it really changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed) for seed, name in enumerate(("run-a", "run-b"))}


@pytest.fixture
def chat(home):
    """A ChatProcess whose every child is ended by its pid afterwards, also when the test failed."""
    proc = ChatProcess(home=home, token_timeout_s=120, load_timeout_s=300)
    pids: list[int] = []
    spawn = proc._spawn

    def recording_spawn(*args, **kwargs):
        child = spawn(*args, **kwargs)
        pids.append(child.popen.pid)
        return child

    proc._spawn = recording_spawn
    yield proc
    proc.unload()
    for pid in pids:
        kill_tree(pid)


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_stream_grows_and_reply_matches(chat, tiny_model_dir):
    info = chat.start(str(tiny_model_dir))
    assert info["loaded"] and info["pid"] == chat.pid != os.getpid()
    assert info["rss_mb"] > 0 and chat.memory_mb > 0
    partials = list(chat.stream(HELLO, LONGER, BASE))
    assert len(partials) >= 2
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(partials))
    assert chat.reply(HELLO, LONGER, BASE) == partials[-1].strip()
    assert (chat.log_path).is_file()  # the child's stderr (and any stray prints) went to the log


def test_compare_and_switch_and_remove_adapters(chat, tiny_model_dir, adapters):
    chat.start(str(tiny_model_dir))
    chat.add_adapter("run-a", adapters["run-a"])
    chat.add_adapter("run-b", adapters["run-b"])
    assert chat.loaded_adapters == {name: str(path) for name, path in adapters.items()}
    assert set(chat.status()["adapters"]) == {"run-a", "run-b"}

    base, tuned = chat.compare(HELLO, "run-a", SHORT)
    assert base != tuned
    assert base == chat.reply(HELLO, SHORT, BASE)  # greedy: the same prompt gives the same answer
    assert tuned == chat.reply(HELLO, SHORT, "run-a")
    other = chat.reply(HELLO, SHORT, "run-b")
    assert other != tuned

    chat.remove_adapter("run-a")
    assert list(chat.loaded_adapters) == ["run-b"]
    with pytest.raises(ChatError, match="not loaded"):
        chat.reply(HELLO, SHORT, "run-a")
    assert chat.reply(HELLO, SHORT, "run-b") == other
    chat.remove_adapter("run-b")
    assert chat.loaded_adapters == {}
    assert chat.reply(HELLO, SHORT, BASE) == base  # all adapters gone: the plain base again
    with pytest.raises(ChatError, match="not an adapter folder"):
        chat.add_adapter("nothing", tiny_model_dir)
    assert chat.alive  # a refused request leaves the process serving


def test_twenty_concurrent_replies_are_all_answered(chat, tiny_model_dir, adapters):
    chat.start(str(tiny_model_dir))
    chat.add_adapter("run-a", adapters["run-a"])
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            answers[i] = chat.reply(
                [{"role": "user", "content": f"Question {i}"}],
                GenerationSettings(max_new_tokens=8, repetition_penalty=3.0),
                "run-a" if i % 2 else BASE,
            )
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert sorted(answers) == list(range(20))
    assert all(isinstance(a, str) for a in answers.values())


def test_a_killed_child_gives_a_clear_error_and_start_works_again(chat, tiny_model_dir):
    chat.start(str(tiny_model_dir))
    pid = chat.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while chat.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ChatError, match=r"ended unexpectedly \(exit code -9.*load the model again"):
        chat.reply(HELLO, SHORT)
    assert not chat.alive and chat.pid is None and gone(pid)  # reaped, not left a zombie
    with pytest.raises(ChatError, match="No chat model is loaded"):
        chat.reply(HELLO, SHORT)
    chat.start(str(tiny_model_dir))
    assert chat.pid != pid
    assert isinstance(chat.reply(HELLO, SHORT), str)


def test_a_crash_mid_reply_raises_and_the_server_side_survives(chat, tiny_model_dir):
    chat.start(str(tiny_model_dir))
    pid = chat.pid
    pieces = chat.stream(HELLO, GenerationSettings(max_new_tokens=200, repetition_penalty=3.0), BASE)
    next(pieces)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ChatError, match="ended unexpectedly"):
        list(pieces)
    assert gone(pid)


def test_unload_ends_the_process(chat, tiny_model_dir, adapters):
    chat.start(str(tiny_model_dir))
    chat.add_adapter("run-a", adapters["run-a"])
    pid = chat.pid
    assert not gone(pid)
    chat.unload()
    assert gone(pid)  # ended and reaped: its memory is back
    assert not chat.alive and chat.pid is None and chat.loaded_adapters == {}
    assert chat.status() == {"loaded": False, "pid": None, "adapters": {}}
    chat.unload()  # twice is harmless


def test_start_again_replaces_the_old_process(chat, tiny_model_dir):
    chat.start(str(tiny_model_dir))
    first = chat.pid
    chat.start(str(tiny_model_dir))
    assert chat.pid != first and gone(first)  # one model in memory at a time


def test_a_bad_model_source_is_reported_and_leaves_no_process(chat, tmp_path):
    with pytest.raises(ChatError, match="does not exist"):
        chat.start(str(tmp_path / "no-such-model"))
    assert not chat.alive


def test_a_reader_that_stops_early_does_not_block_the_next(chat, tiny_model_dir):
    chat.start(str(tiny_model_dir))
    pieces = chat.stream(HELLO, LONGER, BASE)
    first = next(pieces)
    pieces.close()  # like a browser tab closed mid-reply
    full = chat.reply(HELLO, LONGER, BASE)
    assert full.startswith(first.strip())


def test_a_4bit_base_answers_and_takes_an_adapter_trained_in_full_precision(chat, tiny_model_dir, adapters):
    info = chat.start(str(tiny_model_dir), "fp32", quant_mode="4bit")
    assert info["loaded"] and info["weights_in"] == "4bit" and chat.base == (str(tiny_model_dir), "fp32", "4bit")
    base = chat.reply(HELLO, SHORT, BASE)
    assert base
    chat.add_adapter("run-a", adapters["run-a"])  # made on the full-precision tiny model
    tuned = chat.reply(HELLO, SHORT, "run-a")
    assert tuned and tuned != base
    assert chat.reply(HELLO, SHORT, BASE) == base  # the adapter is switched off for "base", not merged in
    assert chat.status()["weights_in"] == "4bit"  # still 4-bit with the adapter on top
