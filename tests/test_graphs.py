"""CUDA graphs of training steps (cxr.graphs): how an epoch is cut into graph replays, how many steps a graph
holds, undoing the warm-up, and, on the CPU, the whole multi-step path of cxr.engine.fit and
cxr.engine.fit with each "graph" replayed eagerly from its static index buffer. That path must give
the eager engine's numbers bit for bit; only the capture itself is left to the CUDA tests."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from cxr import cli, engine, graphs, kernels
from cxr.models import build_model
from cxr.spec import ExperimentSpec

SPEC = ExperimentSpec(name="g", epochs=2, batch_size=24, width=4, loss="ce")  # 256 images: 10 full batches + 16


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------------------------- the epoch

@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_batches_cover_the_permutation_once_in_order_in_replays_of_steps(steps):
    perm = torch.randperm(23)
    chunks = list(graphs.batches(perm, 5, steps))
    sizes = [len(c) for c in chunks]
    full_chunks = 4 // steps if steps > 1 else 0  # 4 full batches of 5, then 3 images
    assert sizes == [steps * 5] * full_chunks + [5] * (4 - full_chunks * steps) + [3]
    assert torch.equal(torch.cat(chunks), perm)


def test_batches_drop_a_last_batch_of_one_image_and_slice_every_member_alike():
    perm = torch.stack([torch.randperm(11) for _ in range(3)])  # a fused group of 3: (members, images)
    chunks = list(graphs.batches(perm, 5, 2))
    assert [c.shape for c in chunks] == [(3, 10)]  # the 11th image alone would be a 1-image batch
    assert torch.equal(chunks[0], perm[:, :10])


def test_steps_per_graph_reads_cxr_graph_steps(monkeypatch):
    monkeypatch.delenv(graphs.STEPS_ENV, raising=False)
    assert graphs.steps_per_graph(10, between_steps=False) == 1  # the default
    monkeypatch.setenv(graphs.STEPS_ENV, "epoch")
    assert graphs.steps_per_graph(10, between_steps=False) == 10
    assert graphs.steps_per_graph(10, between_steps=True) == 1  # an lr schedule or EMA acts between steps
    monkeypatch.setenv(graphs.STEPS_ENV, "4")
    assert graphs.steps_per_graph(10, between_steps=False) == 4
    assert graphs.steps_per_graph(3, between_steps=False) == 3
    assert graphs.steps_per_graph(0, between_steps=False) == 1
    monkeypatch.setenv(graphs.STEPS_ENV, "")
    assert graphs.steps_per_graph(10, between_steps=False) == 1  # empty is the default, as for CXR_FUSE_KERNEL
    # ASCII digits only, as written: int() would take the spaces, the sign, the underscore and the Arabic-Indic 2
    for bad in ("0", "-2", "all", "1.5", " 2 ", "2\n", "+2", "1_0", "\u0662", " epoch"):
        monkeypatch.setenv(graphs.STEPS_ENV, bad)
        with pytest.raises(ValueError, match=rf"CXR_GRAPH_STEPS={re.escape(repr(bad))}: expected a positive integer "
                                             "or 'epoch'"):
            graphs.steps_per_graph(10, between_steps=False)


@pytest.mark.parametrize("var, value, why", [
    ("CXR_GRAPH_STEPS", "all", "expected a positive integer or 'epoch'"),
    ("CXR_GRAPH_STEPS", " 2 ", "expected a positive integer or 'epoch'"),
    ("CXR_FUSE_KERNEL", "vmap", "allowed values are grouped, loop"),
])
def test_a_bad_setting_stops_the_run_command_before_training(tmp_path, capsys, monkeypatch, var, value, why):
    monkeypatch.setenv(var, value)
    assert cli.main(["run", "--epochs", "1", "--seeds", "1", "-k", "bs128 and ce", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"cxr-bench run: error: {var}={value!r}: {why}\n"
    assert not (tmp_path / "runs").exists()


def _adam_steps(model, optimizer, n):
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 2, (8,))
    for _ in range(n):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_undo_warmup_restores_weights_and_statistics_and_clears_a_new_optimizer():
    torch.manual_seed(0)
    model = build_model("cnn", 2, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = graphs.snapshot([model], [optimizer])
    _adam_steps(model, optimizer, 2)
    changed = graphs.snapshot([model], [optimizer])[0][0]
    assert any(not torch.equal(changed[k], before[0][0][k]) for k in changed)
    tensors = {k: v for k, v in model.state_dict().items()}
    graphs.undo_warmup([model], [optimizer], before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][0][k]), k
        assert v.data_ptr() == tensors[k].data_ptr(), k  # in place: a captured graph holds these addresses
    for state in optimizer.state.values():
        assert all(not torch.any(v) for v in state.values() if isinstance(v, torch.Tensor))


def test_undo_warmup_keeps_an_optimizer_state_that_was_there_before():
    """A resumed run, or a group rebuilt after a member stopped, is captured with Adam's moments and step
    count already there: the warm-up's steps must be undone to those values, not to zero."""
    torch.manual_seed(0)
    model = build_model("cnn", 2, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _adam_steps(model, optimizer, 3)
    kept = {p: {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}
    before = graphs.snapshot([model], [optimizer])
    _adam_steps(model, optimizer, 2)
    graphs.undo_warmup([model], [optimizer], before)
    for p, st in optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(v, kept[p][k]), k
    assert all(float(st["step"]) == 3 for st in optimizer.state.values())


# ------------------------------------------------- the multi-step path, with graphs replayed eagerly

class EagerGraph:
    """What a captured graph of len(static) steps does on replay, run eagerly: each step on static[j], with
    fresh gradients (the capture set them to None before each step)."""

    def __init__(self, body, zero_grad, static):
        self.body, self.zero_grad, self.static = body, zero_grad, static
        self.replays = 0

    def replay(self):
        self.replays += 1
        for j in range(len(self.static)):
            self.zero_grad()
            self.body(self.static[j])


class EagerGraphs(list):
    """The EagerGraphs made; capture happens on the CPU while `on` is true."""

    on = False


@pytest.fixture
def eager_graphs(monkeypatch):
    """Graphs captured as EagerGraph on the CPU once `.on` is set; the list of graphs made."""
    made = EagerGraphs()

    def capture(body, zero_grad, static):
        made.append(EagerGraph(body, zero_grad, static))
        return made[-1]

    def warm_up(body, zero_grad, idx):
        for batch_idx in idx:
            zero_grad()
            body(batch_idx)

    monkeypatch.setattr(graphs, "available", lambda device: made.on)
    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(graphs, "warm_up", warm_up)
    return made


@pytest.mark.parametrize("steps", ["1", "4", "epoch"])
def test_fit_with_multi_step_graphs_gives_the_eager_numbers(tiny_data, eager_graphs, monkeypatch, steps):
    eager = engine.fit(SPEC, tiny_data, "cpu", progress=False)
    monkeypatch.setenv(graphs.STEPS_ENV, steps)
    eager_graphs.on = True
    graphed = engine.fit(SPEC, tiny_data, "cpu", progress=False)
    k = {"1": 1, "4": 4, "epoch": 10}[steps]
    assert graphed.cuda_graph and graphed.graph_steps == k and not eager.cuda_graph
    # one graph of k steps, and one of 1 step for the full batches left over (10 = 2 x 4 + 2)
    assert [len(g.static) for g in eager_graphs] == ([4, 1] if k == 4 else [k])
    replays = {1: [20], 4: [4, 4], 10: [2]}[k]  # two epochs
    assert [g.replays for g in eager_graphs] == replays
    assert graphed.train_images == eager.train_images == 2 * 256
    assert _strip(graphed.history) == _strip(eager.history)  # bit for bit: the warm-up was undone
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_schedule_keeps_one_step_per_replay(tiny_data, eager_graphs, monkeypatch):
    monkeypatch.setenv(graphs.STEPS_ENV, "epoch")
    spec = replace(SPEC, schedule="cosine")
    eager_graphs.on = True
    graphed = engine.fit(spec, tiny_data, "cpu", progress=False)
    assert graphed.graph_steps == 1 and [len(g.static) for g in eager_graphs] == [1]
    eager_graphs.on = False
    assert _strip(graphed.history) == _strip(engine.fit(spec, tiny_data, "cpu", progress=False).history)


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_fit_group_with_multi_step_graphs_gives_the_eager_numbers(tiny_data, eager_graphs, monkeypatch, kernel):
    specs = [replace(SPEC, seed=0), replace(SPEC, seed=1, lr=0.003, loss="bce"),
             replace(SPEC, seed=2, optimizer="adamw", weight_decay=0.01)]
    eager = engine.fit(specs, tiny_data, "cpu", progress=False, kernel=kernel)
    monkeypatch.setenv(graphs.STEPS_ENV, "4")
    eager_graphs.on = True
    graphed = engine.fit(specs, tiny_data, "cpu", progress=False, kernel=kernel)
    assert [len(g.static) for g in eager_graphs] == [4, 1]
    assert eager_graphs[0].static.shape == (4, 3, 24)  # (steps, members, batch)
    for g, e in zip(graphed, eager, strict=True):
        assert g.cuda_graph and g.graph_steps == 4 and not e.cuda_graph
        assert _strip(g.history) == _strip(e.history)
        for a, b in zip(g.model.state_dict().values(), e.model.state_dict().values(), strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("steps", ["4", "epoch"])
def test_cuda_multi_step_graphs_train_like_one_step_graphs(tiny_data, monkeypatch, steps):
    """On CUDA, k steps per captured graph (and a 1-step graph for the full batches left over) follow the
    1-step graph's epochs: the same kernels, replayed from a refilled index buffer."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    spec = replace(SPEC, epochs=3)
    one = engine.fit(spec, tiny_data, "cuda", progress=False)
    monkeypatch.setenv(graphs.STEPS_ENV, steps)
    many = engine.fit(spec, tiny_data, "cuda", progress=False)
    assert one.graph_steps == 1 and many.graph_steps == {"4": 4, "epoch": 10}[steps]
    assert many.capture_error is None and many.train_images == one.train_images
    for a, b in zip(many.history, one.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.05)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_cuda_fused_group_with_a_whole_epoch_per_graph(tiny_data, monkeypatch, kernel):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    specs = [replace(SPEC, epochs=3, seed=s, lr=lr) for s, lr in ((0, 0.001), (1, 0.003), (2, 0.01))]
    one = engine.fit(specs, tiny_data, "cuda", progress=False, kernel=kernel)
    monkeypatch.setenv(graphs.STEPS_ENV, "epoch")
    many = engine.fit(specs, tiny_data, "cuda", progress=False, kernel=kernel)
    for a, b in zip(many, one, strict=True):
        assert a.status == "ok" and a.graph_steps == 10 and a.capture_error is None
        for x, y in zip(a.history, b.history, strict=True):
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=0.02)
