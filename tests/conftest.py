"""Shared test settings and checks."""
import os
import tempfile

import pytest
import torch

# The tiny models of the tests run fastest on one thread; on a busy 2-core machine, two intra-op threads
# spin against each other and a step can take 20x longer.
torch.set_num_threads(1)

# The runs the tests make, here and in subprocesses (which copy os.environ), share a token cache of their own,
# removed when the tests end: never the user's ~/.cache/infini-bench.
_TOKEN_CACHE = tempfile.TemporaryDirectory(prefix="infini-bench-test-cache-")
os.environ["INFINI_BENCH_CACHE"] = _TOKEN_CACHE.name


@pytest.fixture
def assert_labels_inside():
    """A check that every axis label and title of a figure lies inside the figure once it is drawn (also after
    the figure was saved and closed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def check(fig) -> None:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer, box = canvas.get_renderer(), fig.bbox
        for ax in fig.axes:
            for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
                extent = text.get_window_extent(renderer)
                inside = box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1
                assert inside, f"{text.get_text()!r} at {extent.bounds} is not inside the figure {box.bounds}"

    return check


@pytest.fixture
def variant_calls():
    """`make -n TARGET` as it would run: the shlex-split words of each `passkey_gpu_variants.py` call it makes."""
    import shlex
    import subprocess
    from pathlib import Path

    def calls(target: str) -> list[list[str]]:
        # Under `make test` the parent make's variables would make this one print "Leaving directory" lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        proc = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=Path(__file__).parents[1], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [shlex.split(line) for line in proc.stdout.splitlines() if "passkey_gpu_variants.py" in line]

    return calls
