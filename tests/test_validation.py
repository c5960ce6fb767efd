"""The training run's validation loss: one mean over every valid token and frame of the evaluation,
equal to the model's loss on all its rows as one batch, whatever the batches, their padding, the
microbatches or the mesh; and the step functions are compiled before the first evaluation."""

import jax
import numpy as np
import pytest

import test_spectron as ts
from spectron_jax import partitioning, trainer, validation

# Two batches of 8 rows: the first full, the second with two short rows and six of padding, so an
# unweighted mean of the two batch means would count the two short rows as much as the first eight.
FULL = dict(prompt_valid=(16, 11, 9, 16, 12, 16, 10, 14), text_valid=(6, 3, 5, 6, 4, 6, 2, 5),
            cont_valid=(8, 5, 6, 8, 7, 8, 4, 6))
SPARSE = dict(prompt_valid=(9, 4) + (1,) * 6, text_valid=(2, 1) + (1,) * 6, cont_valid=(3, 2) + (1,) * 6)
TERMS = ("loss", "text_loss", "ce_text", "z_loss", "spec_frames", "spec_freq_delta", "spec_time_delta_1",
         "spec_time_delta_3", "stop", "num_text_tokens", "num_frames")


def _batches():
    full = ts.make_batch(seed=0, **FULL)
    sparse = ts.make_batch(seed=1, **SPARSE)
    for v in sparse.values():  # rows 2..7 become padding
        v[2:] = 0
    return full, sparse


class _Data:
    """The validation split of one host, from its start: an iterator of host batches with their spec."""

    def __init__(self, batches):
        self.batches = iter(list(batches))
        self.batch_spec = {k: (v.shape, v.dtype) for k, v in batches[0].items()}

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)


@pytest.fixture(scope="module")
def model_and_params():
    # Pre-net dropout at inference (the default) would key its masks by row position: validation turns
    # it off, so the figure cannot depend on where a row sits.
    config = ts.tiny_config(reduction_factor=2, stop_head=True, dropout=0.1, prenet_at_inference=True)
    model = validation.deterministic_model(config)
    return model, model.init_params(0)


class _Split:
    """What `make_data` reads: the host batches in `self.batches` (a test may replace them)."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self):
        return _Data(self.batches)


def _evaluator(model, params, split, mesh, microbatches, eval_batches):
    rules = partitioning.DEFAULT_RULES
    shardings = model.param_shardings(rules, mesh)
    placed = jax.device_put(params, shardings)
    abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    example = partitioning.global_batch_from_host(split.batches[0], mesh, rules)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in example.items()}
    evaluator = validation.Evaluator(model, split, eval_batches, abstract_params, abstract_batch, mesh, rules,
                                     np.float32, microbatches=microbatches, media=False)
    return evaluator, placed


def _reference(model, params, batches):
    """The model's loss terms on every row of `batches` as one batch (the plain eval function)."""
    union = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    loss, metrics = jax.jit(model.eval_fn)(params, union)
    return {k: float(v) for k, v in dict(metrics, loss=loss).items()}


def _assert_terms(got, want):
    assert set(TERMS) <= set(got)
    for term in TERMS:
        assert got[term] == pytest.approx(want[term], rel=2e-5, abs=1e-6), term


@pytest.mark.parametrize("ici,microbatches", [((-1, 1, 1), 1), ((2, 2, 2), 2)])
def test_evaluation_equals_one_batch_of_all_its_rows(model_and_params, ici, microbatches):
    model, params = model_and_params
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ici=ici))
    full, sparse = _batches()
    split = _Split([full, sparse])
    evaluator, placed = _evaluator(model, params, split, mesh, microbatches, eval_batches=2)
    got = evaluator.run(0, placed)
    want = _reference(model, params, [full, sparse])
    _assert_terms(got, want)
    # The unweighted mean of the two batches' means (what evaluation reported before) is another
    # figure: the test tells the two apart.
    per_batch = [_reference(model, params, [b]) for b in (full, sparse)]
    assert abs((per_batch[0]["ce_text"] + per_batch[1]["ce_text"]) / 2 - want["ce_text"]) > 1e-3
    # The same evaluation again (its data re-read from the start) gives the same figures, and so do
    # the same rows in other places: the batches swapped, the rows of each reversed.
    assert evaluator.run(1, placed) == got
    split.batches = [{k: v[::-1].copy() for k, v in b.items()} for b in (sparse, full)]
    _assert_terms(evaluator.run(2, placed), want)


def test_evaluation_reads_eval_batches_and_pads_a_host_that_runs_out(model_and_params):
    model, params = model_and_params
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ici=(-1, 1, 1)))
    full, sparse = _batches()
    # Three batches asked of a split of two: the missing one is all padding and changes nothing.
    split = _Split([full, sparse])
    evaluator, placed = _evaluator(model, params, split, mesh, 1, eval_batches=3)
    _assert_terms(evaluator.run(0, placed), _reference(model, params, [full, sparse]))
    # Only the first batches count; a split without a valid row gives no figures.
    split.batches = [full, full, full, sparse]
    _assert_terms(evaluator.run(0, placed), _reference(model, params, [full, full, full]))
    split.batches = [{k: np.zeros_like(v) for k, v in full.items()}]
    assert evaluator.run(0, placed) == {}


def test_swapped_prefix_terms_read_the_next_rows_prompt(model_and_params):
    """Row i with row i+1's prompt (cyclically in each global batch, before the microbatch split): the
    text terms equal the plain loss of batches whose prompts were rolled by NumPy, and differ from the
    terms with each row's own prompt."""
    model, params = model_and_params
    ici, microbatches = (2, 2, 2), 2
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ici=ici))
    full, sparse = _batches()
    rules = partitioning.DEFAULT_RULES
    shardings = model.param_shardings(rules, mesh)
    placed = jax.device_put(params, shardings)
    abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    example = partitioning.global_batch_from_host(full, mesh, rules)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in example.items()}
    evaluator = validation.Evaluator(model, _Split([full, sparse]), 2, abstract_params, abstract_batch, mesh, rules,
                                     np.float32, microbatches=microbatches, media=False, swapped_prefix=True)
    got = evaluator.run(0, placed)
    rolled = [{k: (np.roll(v, -1, axis=0) if k in validation.PROMPT_KEYS else v) for k, v in b.items()}
              for b in (full, sparse)]
    want = _reference(model, params, rolled)
    own = _reference(model, params, [full, sparse])
    assert got["ce_text_swapped_prefix"] == pytest.approx(want["ce_text"], rel=2e-5, abs=1e-6)
    assert got["ce_text"] == pytest.approx(own["ce_text"], rel=2e-5, abs=1e-6)
    assert abs(want["ce_text"] - own["ce_text"]) > 1e-4
