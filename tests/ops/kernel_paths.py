"""Which way a test runs the gathered decode attention on CPU."""


def use_cpu_kernel(monkeypatch, on: bool) -> None:
    """The gathered decode attention in the C++ kernel (``gazeattn.ops.gaze.cpu_kernel``, which
    must build on this machine: a test of it never passes on the torch path instead), or in
    the torch ops it replaces."""
    from gazeattn.ops.gaze.cpu_kernel import SWITCH, cpu_kernel

    monkeypatch.setenv(SWITCH, "1" if on else "0")
    if on:
        assert cpu_kernel() is not None, "the CPU decode kernel did not build"
