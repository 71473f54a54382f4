"""MultiTaskVAPT against the single-task models it is built from: every row of a mixed batch equals
its task's own model (each of which test_model checks against the official formulation), training
on mixed batches equals training each task on its own images, and bad input is refused before
anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vapt_kernels as vk
from conftest import FLOAT64_BACKENDS, assert_close_rel, images, kernel_cases, randomize_prompts, tiny_vit

CLASSES = {"pets": 5, "cars": 7, "birds": 3}
NO_DROPOUT = dict(conv_dropout=0.0, mlp_dropout=0.0)
CONFIGS = {
    "vapt": dict(num_prompts=3, **NO_DROPOUT),
    "per-channel-deep": dict(
        num_prompts=2, shared_kernel=False, share_projector=False, learnable_scale=True, vpt_depth=2, kernel_size=3,
        padding=1, activation="gelu", **NO_DROPOUT,
    ),
    "no-conv-no-projector": dict(num_prompts=4, conv=False, feature_projector=False, **NO_DROPOUT),
    "vpt-deep": None,
}  # fmt: skip
# Images of one task are not adjacent; "birds" has the fewest classes, so its rows are padded.
MIXED = ["cars", "pets", "cars", "birds", "pets", "cars"]


def _build(base, config, classes: int, backend: str):
    model = copy.deepcopy(base)
    model.reset_classifier(classes)
    model.to(next(base.parameters()))
    if config is None:
        return vk.apply_vpt(model, 3, backend=backend)
    return vk.apply_vapt(model, config, backend=backend)


def task_models(
    config, backend: str = "torch", dtype=torch.float64, device: str = "cpu", **vit
) -> tuple[dict, vk.MultiTaskVAPT]:
    """One single-task model per task of :data:`CLASSES` (one backbone, their own prompts and head),
    and a MultiTaskVAPT of the same backbone holding all of them."""
    torch.manual_seed(0)
    base = tiny_vit(**vit).to(device, dtype)
    models = {}
    for seed, (name, classes) in enumerate(CLASSES.items(), start=1):
        model = _build(base, config, classes, backend)
        randomize_prompts(model, seed)
        with torch.no_grad():
            model.head.weight.normal_()
            model.head.bias.normal_()
        models[name] = model
    mt = vk.MultiTaskVAPT(_build(base, config, 5, backend))
    for name, model in models.items():
        mt.add_task(name, vk.trainable_state_dict(model))
    return models, mt


def assert_rows_equal_their_models(logits, models, x, names, tol: float) -> None:
    assert logits.shape == (len(names), max(CLASSES.values()))
    for i, name in enumerate(names):
        own = models[name](x[i : i + 1])[0]
        C = own.shape[0]
        assert_close_rel(logits[i, :C], own, tol, f"row {i} ({name})")
        assert torch.isneginf(logits[i, C:]).all(), f"row {i} ({name}) is padded with -inf"


@pytest.mark.parametrize("pooled", ["prompts+patches", "prompts"])
@pytest.mark.parametrize("config", ["vapt", "vpt-deep"])
@pytest.mark.parametrize("backend", ["reference", *FLOAT64_BACKENDS])
def test_rows_equal_the_single_task_models_pooling_prompt_outputs(backend, config, pooled):
    """On an average-pooled backbone whose pool reads the last block's prompt outputs (per task:
    adaptive, or static and gathered per image)."""
    vpt_deep = dict(num_prompts=3, vpt_depth=3, feature_projector=False, **NO_DROPOUT)  # what apply_vpt builds
    options = dict(CONFIGS["vapt"] if config == "vapt" else vpt_deep, pooled_tokens=pooled)
    models, mt = task_models(options, backend, global_pool="avg", reg_tokens=1)
    assert mt.model.blocks[-1].appends_prompt_outputs
    x = images(mt.model, batch=len(MIXED))
    with torch.no_grad():
        assert_rows_equal_their_models(mt(x, MIXED), models, x, MIXED, 1e-10)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("backend", ["reference", *FLOAT64_BACKENDS])
def test_rows_equal_the_single_task_models(backend, config):
    models, mt = task_models(config, backend)
    x = images(mt.model, batch=len(MIXED))
    with torch.no_grad():
        by_name = mt(x, MIXED)
        by_index = mt(x, torch.tensor([mt.tasks.index(n) for n in MIXED]))
        assert_rows_equal_their_models(by_name, models, x, MIXED, 1e-10)
    torch.testing.assert_close(by_index, by_name, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", kernel_cases("triton"))
def test_rows_equal_the_single_task_models_in_float32(backend, device):
    models, mt = task_models(CONFIGS["per-channel-deep"], backend, torch.float32, device)
    x = images(mt.model, batch=4).to(device, torch.float32)
    with torch.no_grad():
        assert_rows_equal_their_models(mt(x, MIXED[:4]), models, x, MIXED[:4], 1e-5)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_dynamic_image_size(backend):
    models, mt = task_models(CONFIGS["vapt"], backend, dynamic_img_size=True)
    x = images(mt.model, batch=3, size=(32, 48))
    with torch.no_grad():
        assert_rows_equal_their_models(mt(x, MIXED[:3]), models, x, MIXED[:3], 1e-10)


def test_padded_logits_give_the_task_its_own_softmax_argmax_and_loss():
    models, mt = task_models(CONFIGS["vapt"])
    x = images(mt.model, batch=len(MIXED))
    targets = torch.tensor([6, 0, 3, 2, 4, 1])
    with torch.no_grad():
        logits = mt(x, MIXED)
        padded_loss = F.cross_entropy(logits, targets, reduction="none")
        for i, name in enumerate(MIXED):
            own = models[name](x[i : i + 1])
            C = own.shape[1]
            assert_close_rel(logits[i].softmax(-1)[:C], own[0].softmax(-1), 1e-12, "softmax")
            assert logits[i].softmax(-1)[C:].eq(0).all()
            assert logits[i].argmax() == own[0].argmax()
            assert_close_rel(padded_loss[i], F.cross_entropy(own, targets[i : i + 1]), 1e-12, "cross-entropy")


TRAINING_CASES = [
    *(pytest.param(*p.values, "cpu", torch.float64, 1e-10, marks=p.marks, id=p.id) for p in FLOAT64_BACKENDS),
    *(pytest.param(*p.values, torch.float32, 1e-5, marks=p.marks, id=f"{p.id}-float32") for p in kernel_cases("triton")),
]


@pytest.mark.parametrize("config", ["vapt", "per-channel-deep", "vpt-deep"])
@pytest.mark.parametrize("backend, device, dtype, tol", TRAINING_CASES)
def test_one_step_on_a_mixed_batch_equals_a_step_per_task(backend, device, dtype, tol, config):
    """The gradient of each task's parameters on a mixed batch is the gradient of the loss over its
    own images: one SGD step on the mixed batch leaves every task as a step of its own model on its
    own images does. The backbone stays frozen and in eval mode."""
    models, mt = task_models(CONFIGS[config], backend, dtype, device)
    x = images(mt.model, batch=len(MIXED)).to(device, dtype)
    targets = torch.tensor([6, 0, 3, 2, 4, 1], device=device)
    backbone = {n: p.detach().clone() for n, p in mt.model.named_parameters() if not n.startswith(("vapt.", "head."))}

    mt.train()
    assert not any(m.training for n, m in mt.model.named_modules() if n.startswith(("blocks", "patch_embed", "norm")))
    optimizer = torch.optim.SGD(mt.parameters(), lr=0.5)
    F.cross_entropy(mt(x, MIXED), targets, reduction="sum").backward()
    optimizer.step()

    for name, model in models.items():
        mine = [i for i, n in enumerate(MIXED) if n == name]
        model.train()
        step = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        F.cross_entropy(model(x[mine]), targets[mine], reduction="sum").backward()
        step.step()
        expected = vk.trainable_state_dict(model)
        stepped = mt.task_state_dict(name)
        assert stepped.keys() == expected.keys()
        for key, value in expected.items():
            assert_close_rel(stepped[key], value, tol, f"{name} {key} after one step")
    for n, p in mt.model.named_parameters():
        if n in backbone:
            assert not p.requires_grad and torch.equal(p, backbone[n]), f"backbone {n} changed"


def test_dropout_masks_are_per_image_and_drawn_as_the_single_task_model_draws_them():
    dropout = dict(num_prompts=3, conv_dropout=0.5, mlp_dropout=0.5, prompt_dropout=0.5, vpt_depth=2)
    models, mt = task_models(dropout)
    model = models["cars"].train()
    mt.train()
    x = images(mt.model, batch=1).expand(4, -1, -1, -1)
    torch.manual_seed(3)
    mixed = mt(x, ["cars"] * 4)
    torch.manual_seed(3)
    own = model(x)
    assert_close_rel(mixed, own, 1e-10, "the same masks as the single-task model")
    assert not torch.equal(mixed[0], mixed[1]), "each image draws its own masks"


def _state(config) -> dict:
    models, _ = task_models(config)
    return vk.trainable_state_dict(models["pets"])


def _snapshot(mt) -> dict:
    return {n: (p, p.detach().clone()) for n, p in mt.named_parameters()}


def _unchanged(mt, snapshot) -> None:
    now = dict(mt.named_parameters())
    assert now.keys() == snapshot.keys()
    for n, (p, value) in snapshot.items():
        assert now[n] is p and torch.equal(p, value), n


@pytest.mark.parametrize(
    "other, fields",
    [
        (dict(num_prompts=4, **NO_DROPOUT), ["num_prompts: state dict 4, model 3"]),
        (dict(num_prompts=3, kernel_size=3, **NO_DROPOUT), ["kernel_size: state dict 3, model 2", "padding"]),
        (dict(num_prompts=3, vpt_depth=2, hidden_dim=4, **NO_DROPOUT), ["vpt_depth: state dict 2, model 1", "hidden_dim"]),
        (dict(num_prompts=3, shared_kernel=False, **NO_DROPOUT), ["shared_kernel: state dict False, model True"]),
        (None, ["vpt_depth: state dict 3, model 1"]),
    ],
    ids=["num_prompts", "kernel_size", "vpt_depth-hidden_dim", "shared_kernel", "vpt"],
)
def test_a_task_of_another_config_is_refused_naming_the_fields(other, fields):
    _, mt = task_models(CONFIGS["vapt"])
    before = _snapshot(mt)
    state = _state(other)
    with pytest.raises(ValueError) as raised:
        mt.add_task("other", state)
    message = str(raised.value)
    assert "saved from another VAPT configuration" in message
    for field in fields:
        assert field in message, message
    assert mt.tasks == list(CLASSES)
    _unchanged(mt, before)


def test_bad_task_states_are_refused_before_anything_changes():
    _, mt = task_models(CONFIGS["vapt"])
    before = _snapshot(mt)
    good = mt.task_state_dict("pets")
    cases = {
        "already a task": (ValueError, "pets", good, "there is already a task 'pets'"),
        "a dot": (ValueError, "a.b", good, "without '.'"),
        "not printable": (ValueError, "a\nb", good, "printable"),
        # nn.ModuleDict's own attributes used to fail inside it with a bare KeyError
        "reserved: training": (ValueError, "training", good, "'training' is reserved"),
        "reserved: update": (ValueError, "update", good, "'update' is reserved"),
        "not a mapping": (TypeError, "new", [good], "state_dict must be a mapping"),
        "missing key": (ValueError, "new", {k: v for k, v in good.items() if k != "head.bias"}, "missing keys: head.bias"),
        "unexpected key": (ValueError, "new", {**good, "vapt.extra": good["head.bias"]}, "unexpected keys: vapt.extra"),
        "NaN": (ValueError, "new", {**good, "vapt.prompt": good["vapt.prompt"] * float("nan")}, "NaN"),
        "head width": (ValueError, "new", {**good, "head.weight": torch.zeros(5, 7, dtype=torch.float64)}, "head.weight"),
        "no classes": (
            ValueError, "new", {**good, "head.weight": good["head.weight"][:0], "head.bias": good["head.bias"][:0]},
            "the head has no classes",
        ),
    }
    for case, (error, name, state, words) in cases.items():
        with pytest.raises(error) as raised:
            mt.add_task(name, state)
        assert words in str(raised.value), f"{case}: {raised.value}"
        assert mt.tasks == list(CLASSES), case
    _unchanged(mt, before)


def test_bad_task_arguments_are_refused():
    _, mt = task_models(CONFIGS["vapt"])
    x = images(mt.model, batch=2)
    with pytest.raises(KeyError, match="unknown task\\(s\\) 'dogs'; the tasks are: pets, cars, birds"):
        mt(x, ["pets", "dogs"])
    with pytest.raises(ValueError, match="got 3 task names for a batch of 2 images"):
        mt(x, ["pets"] * 3)
    for bad in (-1, 3):
        with pytest.raises(IndexError, match=f"task indices must lie in \\[0, 3\\), one per image; got values from {min(0, bad)}"):
            mt(x, torch.tensor([0, bad]))
    with pytest.raises(ValueError, match="integer \\(B,\\) = \\(2,\\) tensor of task indices, got torch.float32"):
        mt(x, torch.zeros(2))
    with pytest.raises(TypeError, match="a list of 2 task names"):
        mt(x, "pets")
    with pytest.raises(KeyError, match="no task 'dogs'"):
        mt.remove_task("dogs")
    with pytest.raises(KeyError, match="no task 'dogs'"):
        mt.task_state_dict("dogs")
    empty = vk.MultiTaskVAPT(copy.deepcopy(mt.model))
    with pytest.raises(RuntimeError, match="no tasks yet"):
        empty(x, torch.zeros(2, dtype=torch.long))


def test_adding_and_removing_tasks_leaves_the_others_untouched():
    models, mt = task_models(CONFIGS["vapt"])
    x = images(mt.model, batch=2)
    cars = {n: p for n, p in mt.named_parameters() if ".cars." in n}
    with torch.no_grad():
        before = mt(x, ["cars", "cars"])
    mt.remove_task("pets")
    mt.add_task("pets-again", vk.trainable_state_dict(models["pets"]))
    assert mt.tasks == ["cars", "birds", "pets-again"]
    assert {n: p for n, p in mt.named_parameters() if ".cars." in n} == cars
    with torch.no_grad():
        torch.testing.assert_close(mt(x, ["cars", "cars"]), before, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_task_absent_from_the_batch_is_untouched(optimizer):
    """Absent means untouched: a task not in a training batch gets no gradient (None), so SGD with
    momentum and weight decay and AdamW leave its parameters bitwise as they were and keep no state
    for them, as if it were trained alone; the tasks in the batch are stepped."""
    models, mt = task_models(CONFIGS["vapt"])
    x = images(mt.model, batch=4)
    mt.train()
    params = list(mt.parameters())
    step = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1) if optimizer == "sgd"
            else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1))  # fmt: skip

    def train_on(names):
        step.zero_grad()
        F.cross_entropy(mt(x[: len(names)], names), torch.zeros(len(names), dtype=torch.long)).backward()
        step.step()

    birds = {k: v.clone() for k, v in mt.task_state_dict("birds").items()}
    train_on(["cars", "pets", "cars", "pets"])
    pets = {k: v.clone() for k, v in mt.task_state_dict("pets").items()}
    assert any(not torch.equal(pets[k], v) for k, v in vk.trainable_state_dict(models["pets"]).items())
    cars = {k: v.clone() for k, v in mt.task_state_dict("cars").items()}
    train_on(["cars", "cars"])  # pets is absent now: its momentum and weight decay must not move it
    for name, before in (("birds", birds), ("pets", pets)):
        for key, value in mt.task_state_dict(name).items():
            assert torch.equal(value, before[key]), f"{name} {key} moved while absent"
    assert any(not torch.equal(cars[k], v) for k, v in mt.task_state_dict("cars").items())
    assert not any(id(p) in map(id, step.state) for p in [*mt.prompts["birds"].parameters(), *mt.heads["birds"].parameters()])


@pytest.mark.parametrize("registered", [1, 3, 200])
@pytest.mark.parametrize("backend, device, dtype, tol", TRAINING_CASES)
def test_many_registered_tasks_few_in_the_batch(backend, device, dtype, tol, registered):
    """With 1, 3 or 200 tasks registered and 1 to 3 of them in the batch, every row equals its task's
    own model, by name and by index, and only the tasks in the batch get a gradient."""
    models, mt = task_models(CONFIGS["per-channel-deep"], backend, dtype, device)
    names = list(CLASSES)[:registered]
    for name in CLASSES:
        if name not in names:
            mt.remove_task(name)
    for t in range(registered - len(names)):  # idle tasks: other values, fewer and more classes
        state = vk.trainable_state_dict(models[names[t % len(names)]])
        state = {k: torch.randn_like(v) for k, v in state.items()}
        rows = 2 + t % 9
        state["head.weight"] = torch.randn(rows, state["head.weight"].shape[1], dtype=dtype, device=device)
        state["head.bias"] = torch.randn(rows, dtype=dtype, device=device)
        mt.add_task(f"idle{t}", state)
    assert len(mt.tasks) == registered and mt.max_classes == max(head.out_features for head in mt.heads.values())
    mt.train()
    for batch in ([names[0]], names[:2] * 2, [names[-1], names[0], names[-1]]):
        x = images(mt.model, batch=len(batch)).to(device, dtype)
        logits = mt(x, batch)
        ids = torch.tensor([mt.tasks.index(n) for n in batch])
        with torch.no_grad():
            torch.testing.assert_close(mt(x, ids), logits, rtol=0, atol=0)
        for i, name in enumerate(batch):
            with torch.no_grad():
                own = models[name](x[i : i + 1])[0]
            assert_close_rel(logits[i, : own.shape[0]], own, tol, f"row {i} ({name}) of {registered} registered")
            assert torch.isneginf(logits[i, own.shape[0] :]).all()
        mt.zero_grad()
        logits[torch.isfinite(logits)].sum().backward()
        for name in mt.tasks:
            got = [p.grad is not None for p in [*mt.prompts[name].parameters(), *mt.heads[name].parameters()]]
            assert all(got) if name in batch else not any(got), f"{name}: gradients {got}, batch {batch}"


def test_adding_and_removing_between_forwards_keeps_names_and_indices():
    """Adds and removes interleaved with forwards: an index is always a position in ``tasks``, and
    every row is its task's."""
    models, mt = task_models(CONFIGS["vapt"])
    x = images(mt.model, batch=3)
    mt.eval()
    for change in ("remove cars", "add cars", "remove pets", "remove birds", "add birds", "add pets"):
        verb, name = change.split()
        mt.remove_task(name) if verb == "remove" else mt.add_task(name, vk.trainable_state_dict(models[name]))
        batch = [mt.tasks[i % len(mt.tasks)] for i in range(3)]
        with torch.no_grad():
            by_name = mt(x, batch)
            torch.testing.assert_close(mt(x, torch.tensor([mt.tasks.index(n) for n in batch])), by_name, rtol=0, atol=0)
            for i, task in enumerate(batch):
                own = models[task](x[i : i + 1])[0]
                assert_close_rel(by_name[i, : own.shape[0]], own, 1e-10, f"{task} after {change}")
        assert by_name.shape[1] == max(CLASSES[n] for n in mt.tasks)
    assert mt.tasks == ["cars", "birds", "pets"]


def test_task_state_dict_loads_into_a_single_task_model():
    models, mt = task_models(CONFIGS["per-channel-deep"])
    model = copy.deepcopy(models["birds"])
    randomize_prompts(model, seed=11)
    vk.load_trainable_state_dict(model, mt.task_state_dict("birds"))
    x = images(mt.model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), models["birds"](x), rtol=0, atol=0)


def test_the_model_must_have_a_linear_head():
    model = vk.apply_vapt(tiny_vit(num_classes=0), num_prompts=2)
    with pytest.raises(TypeError, match="classifier must be one nn.Linear"):
        vk.MultiTaskVAPT(model)
    with pytest.raises(ValueError, match="no VAPT prompts"):
        vk.MultiTaskVAPT(tiny_vit())


@pytest.mark.parametrize("vit", [{}, dict(global_pool="avg")], ids=["class-token", "pooling-prompt-outputs"])
def test_compile_and_export_with_task_indices(vit):
    """The serving path: ``torch.compile(fullgraph=True)`` and ``torch.export`` with a LongTensor
    of task indices, equal to eager; an exported model still refuses an index out of range."""
    models, mt = task_models(CONFIGS["per-channel-deep"], "auto", torch.float32, **vit)
    assert mt.model.blocks[-1].appends_prompt_outputs == bool(vit)
    mt.eval()
    x = images(mt.model, batch=4).float()
    ids = torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        eager = mt(x, ids)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(mt, fullgraph=True)(x, ids), eager)
        exported = torch.export.export(mt, (x, ids)).module()
        torch.testing.assert_close(exported(x, ids), eager)
        with pytest.raises(RuntimeError, match="task indices must lie in"):
            exported(x, torch.tensor([1, 0, 3, 1]))
