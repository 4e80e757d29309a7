"""ExecStream: the client's reassembly of exec.output chunks (pure logic, no broker).

What must hold whatever order and multiplicity the chunks arrive in: chunks come out
strictly in seq order, each exactly once, and the stream completes only when it has the
exit and every seq up to last_seq. At the end, the shell's pure parsing helpers (script
splitting, reserveWorker options, status lines, completion).
"""

from __future__ import annotations

import base64
import random
import threading
from typing import Any

import pytest

from client.errors import ClientError
from client.exec_stream import ExecResult, ExecStream, decode_data


def chunks_of(text: bytes, size: int) -> list[tuple[int, str, bytes]]:
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    return [(seq, "stderr" if seq % 5 == 4 else "stdout", part)
            for seq, part in enumerate(parts)]


def exit_doc(last_seq: int, **kw: Any) -> dict[str, Any]:
    return {"exec_id": "e1", "last_seq": last_seq, "exit_code": 0, "duration_s": 0.5, **kw}


def drain(stream: ExecStream) -> list[tuple[int, str, bytes]]:
    out: list[tuple[int, str, bytes]] = []
    while True:
        try:
            chunk = stream.next_chunk(timeout=0)
        except StopIteration:
            return out
        if chunk is None:
            return out
        out.append((chunk.seq, chunk.stream, chunk.data))


def test_in_order_stream_completes_on_exit() -> None:
    s = ExecStream("e1")
    for seq, name, data in chunks_of(b"hello world, line after line", 4):
        assert s.feed(seq, name, data)
    assert not s.complete
    s.feed_exit(exit_doc(6))
    assert s.complete
    res = s.result
    assert res.stdout + res.stderr != b""
    got = b"".join(c.data for c in s)
    assert got == b"hello world, line after line"


def test_out_of_order_is_reordered() -> None:
    s = ExecStream("e1")
    s.feed(2, "stdout", b"c")
    s.feed(1, "stdout", b"b")
    assert drain(s) == []  # seq 0 still missing: nothing may come out yet
    s.feed(0, "stdout", b"a")
    assert [d for _, _, d in drain(s)] == [b"a", b"b", b"c"]


def test_duplicates_are_dropped() -> None:
    s = ExecStream("e1")
    assert s.feed(0, "stdout", b"a")
    assert not s.feed(0, "stdout", b"a")  # already delivered
    assert s.feed(2, "stdout", b"c")
    assert not s.feed(2, "stdout", b"c")  # already buffered
    s.feed(1, "stdout", b"b")
    s.feed_exit(exit_doc(2))
    assert s.duplicates == 2
    assert s.result.stdout == b"abc"
    assert [seq for seq, _, _ in drain(s)] == [0, 1, 2]


def test_exit_before_last_chunks_waits_for_them() -> None:
    s = ExecStream("e1")
    s.feed(0, "stdout", b"a")
    s.feed_exit(exit_doc(2))  # exit overtakes chunks 1 and 2
    assert s.exited
    assert not s.complete
    assert s.missing == [1, 2]
    with pytest.raises(ClientError):
        _ = s.result
    s.feed(2, "stderr", b"!")
    assert not s.complete
    s.feed(1, "stdout", b"b")
    assert s.complete
    assert s.result.stdout == b"ab"
    assert s.result.stderr == b"!"


def test_no_output_completes_with_last_seq_minus_one() -> None:
    s = ExecStream("e1")
    s.feed_exit(exit_doc(-1, exit_code=7))
    assert s.complete
    assert s.result.exit_code == 7
    assert s.result.stdout == b""
    assert list(s) == []


def test_chunk_after_last_seq_is_ignored() -> None:
    s = ExecStream("e1")
    s.feed_exit(exit_doc(0))
    s.feed(0, "stdout", b"x")
    assert not s.feed(5, "stdout", b"late")
    assert s.result.stdout == b"x"


def test_random_permutations_with_duplicates() -> None:
    rng = random.Random(1234)
    payload = bytes(rng.getrandbits(8) for _ in range(5000))
    pieces = chunks_of(payload, 37)
    for _ in range(50):
        arrivals = pieces + rng.sample(pieces, len(pieces) // 3)
        rng.shuffle(arrivals)
        s = ExecStream("e1")
        cut = rng.randrange(len(arrivals))
        for seq, name, data in arrivals[:cut]:
            s.feed(seq, name, data)
        s.feed_exit(exit_doc(len(pieces) - 1))
        for seq, name, data in arrivals[cut:]:
            s.feed(seq, name, data)
        assert s.complete
        got = drain(s)
        assert [seq for seq, _, _ in got] == list(range(len(pieces)))
        assert b"".join(d for _, _, d in got) == payload
        res = s.result
        assert res.stdout == b"".join(d for _, n, d in pieces if n == "stdout")
        assert res.stderr == b"".join(d for _, n, d in pieces if n == "stderr")


def test_consumer_thread_sees_chunks_live_and_in_order() -> None:
    s = ExecStream("e1", keep_output=False)
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        for chunk in s:
            got.append(chunk.seq)
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    order = list(range(200))
    random.Random(7).shuffle(order)
    for seq in order:
        s.feed(seq, "stdout", b"x")
    s.feed_exit(exit_doc(199))
    t.join(5)
    assert done.is_set()
    assert got == list(range(200))
    assert s.result.stdout == b""  # keep_output=False keeps nothing
    assert s.result.output_bytes == 200


def test_unknown_base_buffers_until_set_base() -> None:
    s = ExecStream("e1", start_seq=None)
    s.feed(11, "stdout", b"b")
    s.feed(10, "stdout", b"a")
    s.feed(9, "stdout", b"old")
    assert drain(s) == []
    s.set_base(10)  # the worker's ring starts at 10: 9 is before it
    assert [d for _, _, d in drain(s)] == [b"a", b"b"]


def test_skip_to_counts_lost_chunks() -> None:
    s = ExecStream("e1")
    s.feed(3, "stdout", b"d")
    s.skip_to(2)  # 0 and 1 are gone for good; 2 may still come
    assert not s.feed(1, "stdout", b"too late")
    s.feed_exit(exit_doc(3))
    assert not s.complete
    s.skip_to(3)
    assert s.complete
    assert s.result.lost_chunks == 3
    assert s.result.stdout == b"d"


def test_give_up_completes_after_exit() -> None:
    s = ExecStream("e1")
    s.feed(0, "stdout", b"a")
    s.feed(2, "stdout", b"c")
    s.feed_exit(exit_doc(3))
    s.give_up()
    assert s.complete
    assert s.result.stdout == b"ac"
    assert s.result.lost_chunks == 2


def test_fail_wakes_waiter() -> None:
    s = ExecStream("e1")
    err = ClientError("reservation r1 ended: worker lost")
    threading.Timer(0.05, s.fail, args=(err,)).start()
    with pytest.raises(ClientError, match="worker lost"):
        s.wait(timeout=5)
    with pytest.raises(ClientError, match="worker lost"):
        next(iter(s))


def test_wait_timeout() -> None:
    s = ExecStream("e1")
    with pytest.raises(ClientError, match="did not finish"):
        s.wait(timeout=0.05)


def test_stall_callback_can_fill_gaps() -> None:
    calls: list[int | None] = []

    def on_stall(stream: ExecStream) -> None:
        calls.append(stream.next_seq)
        stream.feed(1, "stdout", b"b")  # what exec.logs would return

    s = ExecStream("e1", stall_s=0.05, on_stall=on_stall)
    s.feed(0, "stdout", b"a")
    s.feed(2, "stdout", b"c")
    s.feed_exit(exit_doc(2))
    res = s.wait(timeout=5)
    assert res.stdout == b"abc"
    assert calls == [1]


def test_close_ends_iteration_and_calls_owner() -> None:
    closed: list[str] = []
    s = ExecStream("e1", on_close=lambda st: closed.append(st.exec_id))
    s.feed(0, "stdout", b"a")
    s.close()
    s.close()
    assert closed == ["e1"]
    assert not s.feed(1, "stdout", b"b")
    assert [c.data for c in s] == [b"a"]


def test_result_fields_and_returncode() -> None:
    s = ExecStream("e1")
    s.feed_exit(exit_doc(-1, exit_code=None, signal=9, timed_out=True, truncated=True))
    r = s.result
    assert (r.exit_code, r.signal, r.timed_out, r.truncated) == (None, 9, True, True)
    assert r.returncode == 137
    assert ExecResult("x", exit_code=3).returncode == 3
    assert ExecResult("x", stdout="héllo".encode()).text == "héllo"


def test_decode_data() -> None:
    assert decode_data(base64.b64encode(b"\x00\xff").decode()) == b"\x00\xff"
    with pytest.raises(ClientError):
        decode_data("not base64!")


# -- the shell's own parsing (pure logic as well) -------------------------------------------


def test_split_script_respects_quotes() -> None:
    """One command per line; `;` belongs to the remote command (issue 8, item 21)."""
    from client.shell import script_commands, split_script

    assert split_script("reserve any\noutput uname -a") == ["reserve any", "output uname -a"]
    assert split_script("reserve any; output uname -a") == ["reserve any; output uname -a"]
    assert split_script("output ls -al | head -3; echo oops >&2") == [
        "output ls -al | head -3; echo oops >&2"]
    assert split_script("output echo 'a\nb'\nps") == ["output echo 'a\nb'", "ps"]
    assert split_script('output echo "x\ny" \\\n z') == ['output echo "x\ny" \\\n z']
    assert split_script("workers\n# a comment\n\nmine\n\n") == ["workers", "mine"]
    assert split_script("output echo \"it's\"\nps") == ["output echo \"it's\"", "ps"]
    with pytest.raises(ClientError, match="unterminated"):
        split_script("output echo 'oops\nps")
    assert script_commands(["reserve any", "output a; b\nps"]) == [
        "reserve any", "output a; b", "ps"]


def test_reserve_args() -> None:
    from client.shell import ShellError, parse_bytes, reserve_args

    assert reserve_args(["0"]) == (0, {}, {})
    assert reserve_args(["vm-w1", "--lease", "60"]) == ("vm-w1", {}, {"lease_s": 60.0})
    assert reserve_args(["any", "--tag", "gpu,fast", "--tag=big", "--min-cpus", "4",
                         "--min-memory", "2G"]) == (
        None, {"tags": ["gpu", "fast", "big"], "min_cpus": 4,
               "min_memory_bytes": 2 * 1024**3}, {})
    assert reserve_args([]) == (None, {}, {})
    for bad in (["--min-cpus", "x"], ["--colour", "red"], ["a", "b"], ["w1", "--tag", "t"],
                ["--tag"]):
        with pytest.raises(ShellError):
            reserve_args(bad)
    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes("1000") == 1000
    with pytest.raises(ShellError):
        parse_bytes("lots")


def test_describe_exit() -> None:
    from client.shell import describe_exit

    assert describe_exit(ExecResult("e", exit_code=0, duration_s=0.123)) == "[exit 0 · 0.12s]"
    assert describe_exit(ExecResult("e", signal=2, duration_s=1)) == \
        "[killed by SIGINT · 1.00s]"
    assert "timed out" in describe_exit(ExecResult("e", signal=15, timed_out=True))


def test_completer_offers_commands_workers_and_exec_ids() -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from client.api import WorkerInfo
    from client.shell import Shell, _completer

    shell = Shell.__new__(Shell)
    shell.listing = [WorkerInfo(id="vm-w1", name="alpha", state="online", index=0)]
    shell.execs = ["abc123", "abd456"]
    completer = _completer(shell)

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert "reserveWorker" in complete("res")
    assert "reserve" in complete("res")
    assert set(complete("reserveWorker ")) >= {"0", "vm-w1", "alpha", "any"}
    assert complete("reserve al") == ["alpha"]
    assert complete("kill ab") == ["abd456", "abc123"]
    assert "KILL" in complete("kill abc123 ")
    assert complete("output ls") == []  # remote command lines are not completed
