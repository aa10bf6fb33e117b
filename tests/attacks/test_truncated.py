"""Attacks on staged models stop at the exit they attack, with the untruncated results.

A staged model written here counts the rows of every stage call; the same network
hidden behind a plain ``forward`` (no ``forward_stage``) takes the generic path, which
runs every stage on every row. Both must give the same adversarial images for the same
random start, and the staged path must skip what the attacked exits do not need.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import Tensor, nn

from neokd_losses.attacks.pgd import MultiExitPGD
from neokd_losses.functional import multi_exit_pgd
from neokd_losses.models.staged import has_exit_split, is_staged, run_stages

E, B, STEPS = 3, 4, 3


class CountingStaged(nn.Module):
    """E tanh layers; stage k carries (h, running sum of h) and its exit reads the sum.

    ``state_kind`` packs the state between stages as a tensor (h and the sum side by
    side), a tuple or a dict, to exercise row selection on every state container.
    """

    def __init__(self, state_kind: str = "dict", num_exits: int = E) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.num_exits = num_exits
        self.state_kind = state_kind
        self.width = 10
        self.body = nn.ModuleList(
            nn.Linear(12 if k == 0 else self.width, self.width) for k in range(num_exits)
        )
        self.heads = nn.ModuleList(nn.Linear(self.width, 5) for _ in range(num_exits))
        self.rows: Counter[int] = Counter()  # stage -> rows run through its block
        self.head_rows: Counter[int] = Counter()  # exit -> rows run through its head
        self.double()

    def _unpack(self, state):
        if self.state_kind == "tensor":
            return state[:, : self.width], state[:, self.width :]
        if self.state_kind == "tuple":
            return state
        return state["h"], state["acc"]

    def _pack(self, h, acc):
        if self.state_kind == "tensor":
            return torch.cat([h, acc], 1)
        if self.state_kind == "tuple":
            return (h, acc)
        return {"h": h, "acc": acc}

    def _block(self, index: int, state):
        if index == 0:
            previous = state.flatten(1)
            self.rows[0] += previous.shape[0]
            h = torch.tanh(self.body[0](previous))
            acc = h
        else:
            previous, acc = self._unpack(state)
            self.rows[index] += previous.shape[0]
            h = torch.tanh(self.body[index](previous))
            acc = acc + h
        return self._pack(h, acc)

    def _exit(self, index: int, state):
        acc = self._unpack(state)[1]
        self.head_rows[index] += acc.shape[0]
        return self.heads[index](acc)

    def forward_stage(self, index: int, state):
        state = self._block(index, state)
        return state, self._exit(index, state)

    def forward(self, x: Tensor) -> list[Tensor]:
        return run_stages(self, x)


class CountingSplit(CountingStaged):
    """CountingStaged with its stages split into blocks and exit heads."""

    def forward_block(self, index: int, state):
        return self._block(index, state)

    def forward_exit(self, index: int, state):
        return self._exit(index, state)


class Plain(nn.Module):
    """The same network without the staged protocol: the attacks' generic path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.inner(x)


def _data(batch: int = B) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(batch, 12, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 5, (batch,), generator=g)


def _attack(model, x, y, norm="Linf", seed=5, **kwargs):
    eps, alpha = (0.1, 0.03) if norm == "Linf" else (0.5, 0.2)
    return MultiExitPGD(
        model,
        eps=eps,
        alpha=alpha,
        steps=STEPS,
        norm=norm,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )(x, y)


def test_the_test_models():
    staged, split = CountingStaged(), CountingSplit()
    assert is_staged(staged) and not is_staged(Plain(staged))
    assert has_exit_split(split) and not has_exit_split(staged)
    x = _data()[0]
    state = block = x
    for index in range(E):  # the split composes to the same weights' forward_stage
        state, logits = staged.forward_stage(index, state)
        block = split.forward_block(index, block)
        torch.testing.assert_close(split.forward_exit(index, block), logits, rtol=0, atol=0)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("exit_index", [0, 1, 2, -1])
def test_single_mode_runs_no_stage_past_the_attacked_exit(exit_index, norm, split):
    model = (CountingSplit if split else CountingStaged)().eval()
    x, y = _data()
    adv = _attack(model, x, y, norm, mode="single", exit_index=exit_index)
    k = exit_index % E
    assert set(model.rows) == set(range(k + 1))  # stages k+1.. never ran
    assert all(model.rows[s] == (STEPS) * B for s in range(k + 1))  # one forward per step
    # Heads of the exits before k: every step without the split, only the first
    # (validating) forward with it.
    assert dict(model.head_rows) == {
        s: (STEPS if s == k or not split else 1) * B for s in range(k + 1)
    }
    model.rows.clear()
    reference = _attack(Plain(model), x, y, norm, mode="single", exit_index=exit_index)
    assert all(model.rows[s] == STEPS * B for s in range(E))  # the generic path runs all
    torch.testing.assert_close(adv, reference, rtol=0, atol=1e-12)


def test_single_mode_exit_index_checked_against_the_stage_count():
    atk = MultiExitPGD(CountingStaged().eval(), steps=1, mode="single", exit_index=3)
    with pytest.raises(ValueError, match=r"\[-3, 3\) for a model with 3 exits, got 3"):
        atk(*_data())


def _max_average_rows(steps: int, batch: int) -> dict[int, int]:
    """Rows per stage of a truncated max-average call: the clean forward (B rows), every
    step of candidate i through stages 0..i, and the scoring of all E·B candidate rows."""
    return {s: batch + steps * (E - s) * batch + E * batch for s in range(E)}


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("state_kind", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("max_batch", [None, 1, 2])
def test_max_average_truncated_equals_generic(state_kind, norm, max_batch, split):
    model = (CountingSplit if split else CountingStaged)(state_kind).eval()
    x, y = _data()
    adv = _attack(model, x, y, norm, max_batch=max_batch)
    assert dict(model.rows) == _max_average_rows(STEPS, B)
    if split:  # head s reads the rows of candidate s only (plus the clean and scoring runs)
        assert dict(model.head_rows) == {s: B + STEPS * B + E * B for s in range(E)}
    else:  # without the split, the rows that go on through stage s run its head too
        assert dict(model.head_rows) == _max_average_rows(STEPS, B)
    model.rows.clear()
    reference = _attack(Plain(model), x, y, norm, max_batch=max_batch)
    if max_batch is None:  # batched and untruncated: every row through every stage
        assert dict(model.rows) == {s: B + STEPS * E * B + E * B for s in range(E)}
    torch.testing.assert_close(adv, reference, rtol=0, atol=1e-12)


def test_max_average_candidates_differ_and_choices_vary():
    # Makes the equality above meaningful: the candidates are distinct images and the
    # selection picks different exits for different samples.
    model = CountingStaged().eval()
    x, y = _data(8)
    candidates = [
        _attack(model, x, y, mode="single", exit_index=i, random_start=False) for i in range(E)
    ]
    adv = _attack(model, x, y, random_start=False)
    picked = [
        next(i for i, c in enumerate(candidates) if torch.equal(adv[j], c[j])) for j in range(8)
    ]
    assert len(set(picked)) > 1


@pytest.mark.parametrize("mode", ["single", "average", "max-average"])
def test_targeted_and_functional_truncated_equal_generic(mode):
    model = CountingStaged().eval()
    x, y = _data()
    kwargs = {"exit_index": 1} if mode == "single" else {}
    runs = [
        multi_exit_pgd(
            net,
            x,
            (y + 1) % 5,
            eps=0.1,
            alpha=0.03,
            steps=STEPS,
            mode=mode,
            targeted=True,
            generator=torch.Generator().manual_seed(2),
            **kwargs,
        )
        for net in (model, Plain(model))
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


def test_normalized_inputs_reach_stage_zero_normalized():
    model = CountingStaged().eval()
    x, y = torch.rand(4, 3, 2, 2, dtype=torch.float64), torch.randint(0, 5, (4,))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    outs = []
    for net in (model, Plain(model)):
        atk = MultiExitPGD(
            net, eps=0.05, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(1)
        )
        atk.set_normalization_used(mean=mean, std=std)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        outs.append(atk((x - m) / s, y))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)


def test_average_mode_and_no_grad_on_staged_model():
    model = CountingStaged().eval()
    x, y = _data()
    with torch.no_grad():
        adv = _attack(model, x, y, mode="average")
    torch.testing.assert_close(adv, _attack(Plain(model), x, y, mode="average"), rtol=0, atol=1e-12)


def test_library_smallcnn_single_mode_skips_the_deeper_blocks():
    from neokd_losses.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    calls: Counter[str] = Counter()
    for name in ("block1", "block2", "block3", "exit1", "exit2"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.update([name]))
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([3, 7])
    adv = _attack(model, x, y, mode="single", exit_index=0)
    assert calls == {"block1": STEPS, "exit1": STEPS}
    calls.clear()
    _attack(model, x, y, mode="single", exit_index=1)
    # exit 1's head only in the first (validating) forward: later steps skip it.
    assert calls == {"block1": STEPS, "exit1": 1, "block2": STEPS, "exit2": STEPS}
    torch.testing.assert_close(
        adv, _attack(Plain(model), x, y, mode="single", exit_index=0), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        _attack(model, x, y), _attack(Plain(model), x, y), rtol=0, atol=1e-12
    )
