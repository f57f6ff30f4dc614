"""Specification of the Hessian-diagonal estimate: Hutchinson's estimator, its probes and block averaging.

Hutchinson: for a Rademacher probe z (entries ±1), E[z ⊙ Hz] = diag(H), because
E[z_i z_j] = 0 for i ≠ j and z_i² = 1.  Component i of one sample is

    (z ⊙ Hz)_i = H_ii + Σ_{j≠i} H_ij z_i z_j,

so a single probe is exact when H is diagonal, and otherwise the sample has mean
H_ii and variance Σ_{j≠i} H_ij² (the products z_i z_j, j ≠ i, are pairwise
uncorrelated ±1 variables).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_adahessian.estimate import block_average, hessian_diagonal_, observed_rows
from hf_adahessian.estimators import hutchinson_diagonal
from hf_adahessian import probes as probes_module
from hf_adahessian.probes import Probes, rademacher_like


def _grads_with_graph(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))


def _quadratic(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """0.5 xᵀAx, whose Hessian is A for symmetric A."""
    return 0.5 * x @ (a @ x)


def _random_spd(n: int, seed: int) -> torch.Tensor:
    """A dense SPD matrix with sizeable off-diagonal entries (so one probe is far from exact)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (m @ m.T / n + 0.5 * torch.eye(n, dtype=torch.float64)).float()


# ---------------------------------------------------------------------------------- estimate
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_one_probe_gives_the_exact_diagonal_of_a_diagonal_quadratic(seed):
    """With A diagonal, z ⊙ Az = diag(A) ⊙ z² = diag(A) for any ±1 probe: no noise at all."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(9, generator=gen) * 3  # negative entries too: the estimate is signed
    x = torch.randn(9, generator=gen).requires_grad_(True)
    (est,) = hutchinson_diagonal(_grads_with_graph(_quadratic(x, torch.diag(a)), [x]), [x], Probes(seed))
    assert est.dtype == torch.float32
    assert torch.equal(est, a)


def test_many_probes_converge_to_the_diagonal_of_a_dense_spd_hessian():
    """The mean of n probes has standard error σ_i = sqrt(Σ_{j≠i} H_ij² / n) in component i.

    With n = 2000 we allow 5 σ_i per component (a two-sided Gaussian tail of 6e-7
    each; the test is deterministic for the seed, the bound is what justifies the
    tolerance).  The bound is also checked to be tight enough to mean something:
    below 10 % of every diagonal entry, and well below the error of a single probe.
    """
    n, n_probes = 8, 2000
    h = _random_spd(n, seed=3)
    x = torch.randn(n, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    grads = _grads_with_graph(_quadratic(x, h), [x])
    (est,) = hutchinson_diagonal(grads, [x], Probes(11), n_samples=n_probes)

    diag = torch.diagonal(h)
    off_diag_sq = (h**2).sum(dim=1) - diag**2
    sigma = torch.sqrt(off_diag_sq / n_probes)
    tolerance = 5 * sigma
    assert (tolerance < 0.1 * diag).all(), "the bound is too loose to test anything"
    err = (est - diag).abs()
    assert (err <= tolerance).all(), f"|error| {err.tolist()} exceeds 5σ {tolerance.tolist()}"

    # One probe alone is visibly noisy here, so the agreement above comes from averaging.
    x1 = x.detach().clone().requires_grad_(True)
    (one,) = hutchinson_diagonal(_grads_with_graph(_quadratic(x1, h), [x1]), [x1], Probes(11))
    assert (one - diag).abs().max() > 10 * err.max()


def test_n_samples_is_the_mean_of_as_many_consecutive_single_probe_estimates():
    """n_samples=k is the mean of z_s ⊙ H z_s over the probes of samples 0..k-1."""
    h = _random_spd(6, seed=5)
    x = torch.randn(6, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    k = 20
    (batched,) = hutchinson_diagonal(_grads_with_graph(_quadratic(x, h), [x]), [x], Probes(2), n_samples=k)
    total = torch.zeros(6)
    for sample in range(k):
        z = Probes(2).draw(0, x, sample, torch.float32)
        (hz,) = torch.autograd.grad(_grads_with_graph(_quadratic(x, h), [x])[0], [x], grad_outputs=z)
        total += z * hz
    # Not bitwise: the batched call accumulates each sample already divided by k.
    torch.testing.assert_close(batched, total / k, rtol=1e-6, atol=1e-6)


def test_scale_divides_the_estimate():
    """``scale`` undoes a loss scale (AMP): the estimate of (S·f) / S is the estimate of f."""
    h = _random_spd(5, seed=8)
    x = torch.randn(5, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    (plain,) = hutchinson_diagonal(_grads_with_graph(_quadratic(x, h), [x]), [x], Probes(0))
    (scaled,) = hutchinson_diagonal(_grads_with_graph(1024.0 * _quadratic(x, h), [x]), [x], Probes(0),
                                    scale=1024.0)
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------- probes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8])
def test_probes_are_plus_or_minus_one_in_the_shape_and_dtype_asked_for(dtype):
    t = torch.empty(50, 40)
    z = Probes(0).draw(3, t, dtype=dtype)
    assert z.shape == t.shape and z.dtype == dtype and z.device == t.device
    assert set(z.unique().tolist()) == {-1, 1}
    # Balanced: the mean of 2000 fair ±1 has standard deviation 1/sqrt(2000) ≈ 0.022.
    assert abs(z.float().mean().item()) < 5 / math.sqrt(z.numel())


def test_a_probe_is_a_function_of_seed_step_parameter_and_sample_only():
    """What lets every micro-batch, every process and a resumed run draw the same z with no saved state:
    the same (seed, step, parameter, sample) gives the same probe whatever was drawn before, and
    changing any one of them gives another."""
    t = torch.empty(1000)
    first = Probes(42, step=7).draw(3, t, sample=1)
    busy = Probes(42, step=7)
    for i in range(5):
        busy.draw(i, t)
    assert torch.equal(busy.draw(3, t, sample=1), first)
    for other in (Probes(43, 7).draw(3, t, 1), Probes(42, 8).draw(3, t, 1), Probes(42, 7).draw(4, t, 1),
                  Probes(42, 7).draw(3, t, 0)):
        assert not torch.equal(other, first)
    # Different draws are uncorrelated: agreement of two ±1 streams is ~50%.
    agree = (Probes(42, 7).draw(3, t, 0) == first).float().mean().item()
    assert abs(agree - 0.5) < 5 * 0.5 / math.sqrt(t.numel())


def test_rademacher_like_draws_from_the_generator_it_is_given():
    t = torch.empty(300)
    a = rademacher_like(t, torch.Generator().manual_seed(5))
    assert torch.equal(a, rademacher_like(t, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, rademacher_like(t, torch.Generator().manual_seed(6)))


def _reference_rademacher(t: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The probe stream written out: one random byte per eight probes, bit k of the byte (lowest first)
    giving probe k as 2·bit − 1.  Checkpoints resume on this stream, so the fast draw must keep it."""
    n = t.numel()
    random_bytes = torch.empty((n + 7) // 8, dtype=torch.uint8).random_(0, 256, generator=generator)
    bits = [(int(b) >> k) & 1 for b in random_bytes for k in range(8)][:n]
    return (torch.tensor(bits, dtype=torch.int64) * 2 - 1).to(dtype).view(t.shape)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (13, 17, 3)])
def test_the_fast_draw_is_the_reference_stream(shape, dtype):
    t = torch.empty(shape)
    assert torch.equal(rademacher_like(t, torch.Generator().manual_seed(11), dtype),
                       _reference_rademacher(t, torch.Generator().manual_seed(11), dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel", [5, 8 * 131072 * 2 + 3])  # within one slice; across three slices
def test_adding_a_probe_in_place_equals_adding_the_drawn_probe(numel, dtype):
    """The finite-difference perturbation θ += εz, made slice by slice without a parameter-sized z, is
    bit for bit what adding the drawn int8 probe gives."""
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = theta.clone().add_(Probes(3, 9).draw(2, theta, 0, torch.int8), alpha=1.234e-3)
    Probes(3, 9).perturb_(2, theta, 1.234e-3)
    assert torch.equal(theta, expected)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32 if t.dtype == torch.float32 else torch.int16)


def _awkward_theta(numel: int, dtype: torch.dtype, alpha: float) -> torch.Tensor:
    """Weights of a trained layer's scale, with the entries a round trip θ + αz − αz loses: far below α,
    subnormal, zeros of both signs, NaN, ±inf, and entries near α itself."""
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.05
    special = torch.tensor([0.0, -0.0, 1e-9, -3e-12, 1e-40, float("nan"), float("inf"), -float("inf"),
                            alpha, -alpha, alpha / 3, 2 * alpha + 1e-12], dtype=torch.float64)
    theta[: len(special)] = special
    theta[-len(special):] = special
    return theta.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel, chunk_bytes", [(37, None), (8 * 131072 * 2 + 3, None), (1001, 5)],
                         ids=["one slice", "three slices", "slices of 40 entries, a GPU's slicing in small"])
def test_a_perturbation_is_undone_bit_for_bit_without_a_copy_of_the_tensor(numel, chunk_bytes, dtype, monkeypatch):
    """θ + εz as adding the drawn probe makes it, then θ again to the bit (−0.0, NaN and subnormals included).  For
    fp32 and fp64 what is kept is the few entries whose round trip rounds differently, not θ: here fewer
    than 1 % of them, at the ε a finite-difference step takes (1e-3 of the entries' scale)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(probes_module, "_chunk_bytes", lambda device: chunk_bytes)
    alpha = 0.05e-3
    theta = _awkward_theta(numel, dtype, alpha)
    probes = Probes(3, 9)
    perturbed = theta.clone()
    record = probes.perturb_(2, perturbed, alpha)
    assert torch.equal(_bits(perturbed), _bits(theta.clone().add_(probes.draw(2, theta, 0, torch.int8), alpha=alpha)))
    assert not torch.equal(_bits(perturbed), _bits(theta))
    probes.restore_(perturbed, alpha, record)
    assert torch.equal(_bits(perturbed), _bits(theta))
    if dtype == torch.bfloat16:
        assert torch.equal(_bits(record), _bits(theta))  # no slices in bf16: a copy, as before
        return
    kept = [r for r in record.kept if r is not None]
    assert all(isinstance(r, tuple) for r in kept)  # positions and values, never a slice's copy
    count = sum(len(positions) for positions, _ in kept)
    assert count >= 5  # at least −0.0, 1e-9, −3e-12, 1e-40 and NaN's siblings do not come back by subtraction
    assert numel < 10_000 or count < 0.01 * numel  # a realistic scale, not a few planted entries


def test_where_most_of_a_slice_would_not_come_back_the_slice_is_kept_whole():
    """Entries all far below ε: more than a third of them lose bits, so the record is the slice's values."""
    theta = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1e-9
    perturbed = theta.clone()
    probes = Probes(0, 1)
    record = probes.perturb_(0, perturbed, 1e-3)
    assert len(record.kept) == 1 and torch.equal(record.kept[0], theta)
    probes.restore_(perturbed, 1e-3, record)
    assert torch.equal(_bits(perturbed), _bits(theta))


@pytest.mark.parametrize("shape", [(50, 16), (50, 6), (40, 8, 2), (30,)])  # whole-byte rows, ragged, 3-D, 1-D
def test_drawing_some_rows_of_a_probe_gives_those_rows_of_the_whole_probe(shape):
    t = torch.empty(shape)
    rows = torch.tensor([0, 3, 7, 29])
    assert torch.equal(Probes(3, 5).draw_rows(2, t, rows, 1), Probes(3, 5).draw(2, t, 1)[rows])


def test_kept_probes_are_drawn_once_and_are_the_probes_drawn_without_keeping():
    t = torch.empty(6, 8)
    probes = Probes(4, 2)
    with probes.kept():
        first = probes.draw(1, t)
        assert probes.draw(1, t) is first
        assert probes.draw(1, t, sample=1) is not first
    assert torch.equal(first, Probes(4, 2).draw(1, t))
    assert probes.draw(1, t) is not first  # nothing kept after the context


def test_estimation_never_touches_the_global_rng():
    """Probes come from the estimator's own generator: dropout masks and data order do not move."""
    h = _random_spd(6, seed=1)
    x = torch.randn(6, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    grads = _grads_with_graph(_quadratic(x, h), [x])
    before = torch.get_rng_state()
    hutchinson_diagonal(grads, [x], Probes(0), n_samples=5)
    Probes(1).draw(0, x)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------------- zero curvature
def test_parameters_without_curvature_get_zero_without_error():
    """No Hessian path, no error: the estimate is exactly zero.

    * ``lin``: the loss is linear in it, so its gradient is a constant with no graph;
    * ``coupled_to_input``: its gradient is an input that requires grad (so the
      gradient does carry a graph), but nothing in that graph depends on the parameter;
    * ``unused``: not in the loss at all (gradient None).
    ``curved`` keeps a real Hessian, so the call does compute a product.
    """
    gen = torch.Generator().manual_seed(0)
    lin = torch.randn(3, generator=gen).requires_grad_(True)
    coupled_to_input = torch.randn(3, generator=gen).requires_grad_(True)
    unused = torch.randn(2, 2, generator=gen).requires_grad_(True)
    curved = torch.randn(3, generator=gen).requires_grad_(True)
    data = torch.randn(3, generator=gen)
    inp = torch.randn(3, generator=gen).requires_grad_(True)  # an input, not a parameter
    loss = (lin * data).sum() + (coupled_to_input * inp).sum() + (curved**4).sum()
    params = [lin, coupled_to_input, unused, curved]
    grads = _grads_with_graph(loss, params)
    assert grads[2] is None and not grads[0].requires_grad and grads[1].requires_grad

    est = hutchinson_diagonal(grads, params, Probes(0), n_samples=2)
    for p, e in zip(params[:3], est[:3]):
        assert e.shape == p.shape and torch.equal(e, torch.zeros_like(e))
    torch.testing.assert_close(est[3], 12 * curved.detach() ** 2)


def test_all_parameters_without_curvature_is_not_an_error():
    """A loss linear in every parameter (no gradient has a graph) gives all-zero estimates."""
    w = torch.ones(4, requires_grad=True)
    grads = _grads_with_graph((w * torch.arange(4.0)).sum(), [w])
    (est,) = hutchinson_diagonal(grads, [w], Probes(0))
    assert torch.equal(est, torch.zeros(4))


def test_probe_stream_does_not_depend_on_which_parameters_have_curvature():
    """Every parameter gets a probe, in order, with or without a Hessian path.

    So the estimate for ``b`` is the same whether ``a`` before it is curved or linear.
    """
    gen = torch.Generator().manual_seed(1)
    h = _random_spd(5, seed=2)
    a = torch.randn(3, generator=gen).requires_grad_(True)
    b = torch.randn(5, generator=gen).requires_grad_(True)
    with_curved_a = hutchinson_diagonal(_grads_with_graph((a**3).sum() + _quadratic(b, h), [a, b]),
                                        [a, b], Probes(3))
    with_linear_a = hutchinson_diagonal(_grads_with_graph(a.sum() + _quadratic(b, h), [a, b]),
                                        [a, b], Probes(3))
    assert torch.equal(with_curved_a[1], with_linear_a[1])


# ---------------------------------------------------------------------------------- block_average
def _reference_block_average(d: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks of ``block_size`` along the last dim, the last one shorter; one Python mean per block."""
    out = d.clone()
    *lead, n = d.shape
    for prefix in itertools.product(*(range(s) for s in lead)):
        row = d[prefix].tolist()
        for start in range(0, n, block_size):
            block = row[start:start + block_size]
            out[prefix][start:start + block_size] = sum(block) / len(block)
    return out


@pytest.mark.parametrize("shape", [(), (7,)])
@pytest.mark.parametrize("block_size", [1, 3, 32])
def test_block_average_leaves_0d_and_1d_tensors_untouched(shape, block_size):
    d = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = block_average(d, block_size)
    assert out.shape == d.shape and torch.equal(out, d)


def test_block_size_one_leaves_every_tensor_untouched():
    d = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(block_average(d, 1), d)


def test_block_average_of_a_2d_tensor_uses_blocks_along_the_last_dim_with_a_short_last_block():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0],
                      [10.0, 20.0, 30.0, 40.0, 50.0]])
    before = d.clone()
    # Blocks of 2: [0, 1], [2, 3] and the short block [4].
    assert torch.equal(block_average(d, 2), torch.tensor([[1.5, 1.5, 3.5, 3.5, 5.0],
                                                          [15.0, 15.0, 35.0, 35.0, 50.0]]))
    # Blocks of 3: [0, 1, 2] and the short block [3, 4].
    assert torch.equal(block_average(d, 3), torch.tensor([[2.0, 2.0, 2.0, 4.5, 4.5],
                                                          [20.0, 20.0, 20.0, 45.0, 45.0]]))
    # A block at least as long as a row averages each row on its own.
    assert torch.equal(block_average(d, 5), torch.tensor([[3.0] * 5, [30.0] * 5]))
    assert torch.equal(block_average(d, 32), torch.tensor([[3.0] * 5, [30.0] * 5]))
    assert torch.equal(d, before), "block_average must not modify its input"


@pytest.mark.parametrize("shape, block_size", [((2, 3, 5), 2), ((2, 3, 4), 3), ((2, 2, 2, 3, 5), 2), ((3, 1, 2, 2, 4), 4)])
def test_block_average_of_3d_and_5d_tensors_averages_each_block_of_each_row_on_its_own(shape, block_size):
    """Each row (all leading indices fixed) is split on its own: a block never mixes rows.

    Rows are offset by 1000 × their index, so a value borrowed from another row
    would show up far outside the row's range.
    """
    n_rows = math.prod(shape[:-1])
    rows = torch.arange(n_rows, dtype=torch.float32).reshape(*shape[:-1], 1) * 1000
    d = rows + torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = block_average(d, block_size)
    assert out.shape == d.shape
    torch.testing.assert_close(out, _reference_block_average(d, block_size), rtol=1e-6, atol=1e-4)
    assert ((out - rows) >= 0).all() and ((out - rows) <= 1).all(), "a block mixed values from another row"


def test_conv_kernels_are_averaged_over_their_spatial_dims():
    """A 4-D (out, in, kh, kw) kernel: each (out, in) filter gets the mean over its kh × kw taps."""
    d = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = block_average(d, 1, average_conv_kernel=True)
    for o in range(3):
        for i in range(2):
            expected = sum(d[o, i].flatten().tolist()) / 9
            torch.testing.assert_close(out[o, i], torch.full((3, 3), expected), rtol=1e-6, atol=1e-7)
    # With block_size > 1 the spatial means are already constant along kw: nothing changes.
    torch.testing.assert_close(block_average(d, 2, average_conv_kernel=True), out, rtol=1e-6, atol=1e-7)


def test_conv_kernels_are_not_averaged_when_average_conv_kernel_is_false():
    d = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(block_average(d, 1, average_conv_kernel=False), d)
    # They are then blocked like any other tensor: blocks of 2 along kw, the last of one tap.
    torch.testing.assert_close(block_average(d, 2, average_conv_kernel=False), _reference_block_average(d, 2),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, block_size", [
    ((6, 64), 32),      # blocks tile the last dim: D is a broadcast of the block means
    ((3, 4, 96), 32),
    ((6, 70), 32),      # a ragged last block: D is written out
    ((6, 64), 1),
    ((50,), 32),        # 1-D: no blocks
    ((4, 3, 3, 3), 2),  # a conv kernel: spatial average first
    ((), 4),
])
def test_the_diagonal_step_takes_is_the_block_average_of_the_absolute_sums(shape, block_size):
    """What step() takes from an estimate: D = block_average(|sums|), its observed rows and its sum,
    whether D is written out or a view of the block means."""
    s = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    if s.dim():
        s[1] = 0.0  # an unobserved row
    d, rows, total = hessian_diagonal_(s.clone(), block_size)
    expected = block_average(s.abs(), block_size)
    tiled = expected.shape[:-1] + (expected.shape[-1] // block_size, block_size) if s.dim() else ()
    assert d.shape in (expected.shape, tiled)
    torch.testing.assert_close(d.reshape(expected.shape), expected, rtol=1e-6, atol=0)
    assert torch.equal(rows, observed_rows(s.abs()))
    torch.testing.assert_close(total, expected.sum(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------- coverage
def test_a_row_is_observed_when_any_of_its_entries_is_nonzero():
    """Rows are slices along the first dim of |D|; a 1-D tensor's rows are its entries, a 0-d tensor is one row."""
    s = torch.zeros(5, 3)
    s[1, 2] = 0.5
    s[3] = 1.0
    s[4, 0] = torch.finfo(torch.float32).tiny / 4  # a subnormal alone still counts
    assert observed_rows(s).tolist() == [False, True, False, True, True]
    # The same rows as testing every entry for zero, on a random |D| with rows zeroed.
    d = torch.randn(64, 7).abs_().index_fill_(0, torch.tensor([0, 5, 63]), 0.0)
    assert torch.equal(observed_rows(d), d.ne(0).any(dim=1))
    assert observed_rows(torch.tensor([0.0, 2.0, 0.0])).tolist() == [False, True, False]
    assert observed_rows(torch.tensor(0.0)).item() is False
    assert observed_rows(torch.zeros(2, 2, 3, 3).index_fill_(0, torch.tensor([1]), 1.0)).tolist() == [False, True]


def test_embedding_rows_no_token_used_have_an_estimate_of_exactly_zero():
    """Why "exactly zero" can stand for "not observed": an embedding row outside the batch has
    a zero gradient and a zero Hessian row, so its z ⊙ Hz sum is exactly 0."""
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 1)
    tokens = torch.tensor([[1, 3, 3], [5, 1, 7]])
    loss = torch.tanh(head(emb(tokens))).pow(2).sum()
    grads = _grads_with_graph(loss, [emb.weight])
    (est,) = hutchinson_diagonal(grads, [emb.weight], Probes(0))
    assert observed_rows(est.abs()).nonzero().flatten().tolist() == [1, 3, 5, 7]


def test_a_micro_batchs_gradients_are_let_go_before_its_second_backward_and_add_up_as_before(monkeypatch):
    """With two micro-batches, the second one's gradient goes into .grad before its Hessian-vector
    product and nothing else holds it then (a parameter-sized tensor less alive in that backward);
    .grad and the estimate are what adding afterwards gave, bit for bit."""
    import weakref

    from hf_adahessian import AdaHessian
    from hf_adahessian import estimators

    torch.manual_seed(0)
    x = torch.randn(6, 5)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(3))

    def loss_of(rows):
        return (torch.tanh(x[rows] @ w + b) ** 2).sum()

    alive_in_second_backward, made = [], []
    make = estimators.gradients_with_graph
    backward = estimators._ProbeDot.backward

    def recorded(loss, params, rows=()):
        out = make(loss, params, rows)
        made[:] = [weakref.ref(g) for g in out[0]]
        return out

    def probe_backward(ctx, grad_out):
        alive_in_second_backward.append(sum(ref() is not None for ref in made))
        return backward(ctx, grad_out)

    monkeypatch.setattr(estimators, "gradients_with_graph", recorded)
    monkeypatch.setattr(estimators._ProbeDot, "backward", staticmethod(probe_backward))
    optimizer = AdaHessian([w, b], lr=0.1, seed=3)
    estimate = optimizer.estimate()
    for rows in (slice(0, 3), slice(3, 6)):
        estimate.accumulate(loss_of(rows))
    assert alive_in_second_backward and set(alive_in_second_backward) == {0}

    # The same sums and .grad as adding each gradient after its product (the functional form, by hand).
    grad_sum, est_sum = None, None
    for rows in (slice(0, 3), slice(3, 6)):
        grads = list(make(loss_of(rows), [w, b])[0])
        terms = hutchinson_diagonal(grads, [w, b], Probes(3, 0))
        grads = [g.detach() for g in grads]
        grad_sum = grads if grad_sum is None else [a + g for a, g in zip(grad_sum, grads)]
        est_sum = terms if est_sum is None else [a + t for a, t in zip(est_sum, terms)]
    for p, g in zip((w, b), grad_sum):
        assert torch.equal(p.grad, g)
    for got, want in zip(estimate.terms(), est_sum):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
