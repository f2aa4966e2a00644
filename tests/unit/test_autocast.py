"""train.autocast: "auto" picks bf16 only where bf16 is native."""

import torch

import tuneforge.train.loop as loop


def test_explicit_kinds_pass_through():
    for kind in ("none", "bf16", "fp16"):
        assert loop.resolve_autocast(kind, torch.device("cpu")) == kind


def test_auto_on_cpu_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert loop.resolve_autocast("auto", torch.device("cpu")) == "none"
    assert loop.make_autocast("auto", torch.device("cpu"))().__class__.__name__ == "nullcontext"
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.resolve_autocast("auto", torch.device("cpu")) == "bf16"
    with loop.make_autocast("auto", torch.device("cpu"))():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_cpu_flag_reader_reads_proc_cpuinfo(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    fake = tmp_path / "cpuinfo"

    def fake_open(path, *a, **k):
        return real_open(fake if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert loop.cpu_has_native_bf16() is False
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert loop.cpu_has_native_bf16() is True
