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


def task_parameters(mt: vk.MultiTaskVAPT, name: str) -> list[torch.Tensor]:
    return [d[name] for d in (mt.prompts, mt.head_weights, mt.head_biases) if name in d]


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
    cars = {n: p for n, p in mt.named_parameters() if n.endswith(".cars")}
    with torch.no_grad():
        before = mt(x, ["cars", "cars"])
    mt.remove_task("pets")
    mt.add_task("pets-again", vk.trainable_state_dict(models["pets"]))
    assert mt.tasks == ["cars", "birds", "pets-again"]
    assert {n: p for n, p in mt.named_parameters() if n.endswith(".cars")} == cars
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
    assert not any(id(p) in map(id, step.state) for p in task_parameters(mt, "birds"))


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
    assert len(mt.tasks) == registered and mt.max_classes == max(w.shape[0] for w in mt.head_weights.values())
    mt.train()
    for batch in ([names[0]], names[:2] * 2, [names[-1], names[0], names[-1]]):
        x = images(mt.model, batch=len(batch)).to(device, dtype)
        logits = mt(x, batch)
        ids = torch.tensor([mt.tasks.index(n) for n in batch])
        torch.testing.assert_close(mt(x, ids).detach(), logits.detach(), rtol=0, atol=0)
        for i, name in enumerate(batch):
            with torch.no_grad():
                own = models[name](x[i : i + 1])[0]
            assert_close_rel(logits[i, : own.shape[0]], own, tol, f"row {i} ({name}) of {registered} registered")
            assert torch.isneginf(logits[i, own.shape[0] :]).all()
        mt.zero_grad()
        logits[torch.isfinite(logits)].sum().backward()
        for name in mt.tasks:
            got = [p.grad is not None for p in task_parameters(mt, name)]
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


# ------------------------------------------------------------------------------------------------
# the task table, the serving cache, the state dict
# ------------------------------------------------------------------------------------------------


def assert_serves_from_the_table(mt: vk.MultiTaskVAPT, x: torch.Tensor) -> None:
    """What a compiled or exported graph computes without gradients (each image reading its task's
    rows of the table) equals the eager forward: the tasks' parameters are the table's rows."""
    ids = torch.arange(x.shape[0]) % len(mt.tasks)
    with torch.no_grad():
        torch.testing.assert_close(mt._serve_traced(x, mt.task_index(ids, x.shape[0], x.device)), mt(x, ids),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip


def test_adding_and_removing_many_tasks_keeps_every_other_task_bitwise():
    """Adds and removes enough to grow the table and to reclaim removed tasks' rows more than once:
    every task keeps its values bitwise, its parameters stay the same objects and views of its rows."""
    models, mt = task_models(CONFIGS["per-channel-deep"])
    x = images(mt.model, batch=4)
    states = {name: vk.trainable_state_dict(models[name]) for name in CLASSES}
    shapes = {k: v.shape for k, v in states["pets"].items()}
    generator = torch.Generator().manual_seed(3)
    for t in range(40):
        name = f"extra{t}"
        state = {k: torch.randn(shape, generator=generator, dtype=torch.float64) for k, shape in shapes.items()}
        rows = 1 + t % 6
        state["head.weight"], state["head.bias"] = torch.randn(rows, 24, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
        mt.add_task(name, state)
        states[name] = state
        if t % 3 != 2:  # remove two of every three: the removed rows are reclaimed as they pile up
            victim = mt.tasks[(7 * t) % len(mt.tasks)]
            mt.remove_task(victim)
            del states[victim]
    kept = {name: task_parameters(mt, name) for name in mt.tasks}
    mt.add_task("last", states[mt.tasks[0]])
    assert all(a is b for name in kept for a, b in zip(kept[name], task_parameters(mt, name)))
    assert set(mt.tasks) == set(states) | {"last"} and len(mt.tasks) == len(states) + 1
    for name, state in states.items():
        for key, value in mt.task_state_dict(name).items():
            assert torch.equal(value, state[key]), f"{name} {key}"
    assert mt.max_classes == max(v["head.weight"].shape[0] for v in states.values())
    assert_serves_from_the_table(mt, x)


@pytest.mark.parametrize("route", ["to", "deepcopy", "pickle", "load-assign"])
def test_every_route_that_copies_parameters_keeps_them_rows_of_the_table(route, tmp_path):
    """``.to()`` converts, ``copy.deepcopy`` and pickling copy, ``load_state_dict(assign=True)``
    replaces each parameter on its own: the table is rebuilt from them, so what a compiled graph
    reads is what the parameters hold."""
    models, mt = task_models(CONFIGS["vapt"])
    x = images(mt.model, batch=3)
    if route == "to":
        mt = mt.float().double()
    elif route == "deepcopy":
        mt = copy.deepcopy(mt)
    elif route == "pickle":
        torch.save(mt, tmp_path / "mt.pt")
        mt = torch.load(tmp_path / "mt.pt", weights_only=False)
    else:
        state = {k: v.clone() + 1 if k.startswith(("prompts.", "head_")) else v for k, v in mt.state_dict().items()}
        mt.load_state_dict(state, assign=True)
        assert torch.equal(mt.prompts["cars"], state["prompts.cars"])
    assert_serves_from_the_table(mt, x)
    for name in CLASSES:
        own = models[name](x[:1])[0]
        if route != "load-assign":
            with torch.no_grad():
                assert_close_rel(mt(x[:1], [name])[0, : own.shape[0]], own, 1e-6 if route == "to" else 1e-10, name)
    with torch.no_grad():  # what a step writes into the parameters, the table holds
        for name in CLASSES:
            mt.prompts[name].add_(0.5)
            mt.head_weights[name].mul_(2.0)
    assert_serves_from_the_table(mt, x)


def test_state_dict_round_trips_every_task_into_a_model_with_other_or_no_tasks(tmp_path):
    """``state_dict()`` holds every task's values and the task list; loading it gives a model with
    other tasks, or none, exactly the saved tasks in the saved order (through a weights-only file)."""
    models, mt = task_models(CONFIGS["per-channel-deep"])
    mt.remove_task("pets")  # an order that is not the order of CLASSES
    mt.add_task("pets", vk.trainable_state_dict(models["pets"]))
    torch.save(mt.state_dict(), tmp_path / "mt.pt")
    x = images(mt.model, batch=3)
    with torch.no_grad():
        expected = mt(x, ["pets", "birds", "cars"])
    _, other = task_models(CONFIGS["per-channel-deep"])
    other.remove_task("cars")
    other.add_task("dogs", vk.trainable_state_dict(models["cars"]))
    empty = vk.MultiTaskVAPT(copy.deepcopy(other.model))
    for target in (other, empty):
        result = target.load_state_dict(torch.load(tmp_path / "mt.pt", weights_only=True))
        assert not result.missing_keys and not result.unexpected_keys
        assert target.tasks == ["cars", "birds", "pets"] == mt.tasks
        with torch.no_grad():
            torch.testing.assert_close(target(x, ["pets", "birds", "cars"]), expected, rtol=0, atol=0)
        assert_serves_from_the_table(target, x)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("nan", "prompts.birds: holds 1 NaN"),
        ("shape", "head_weights.cars: state dict (7, 23) vs model (7, 24)"),
        ("missing", "missing keys: head_biases.pets"),
        ("names", "_extra_state must be {'tasks': [distinct task names]}"),
    ],
)
def test_a_bad_state_dict_changes_nothing(damage, words):
    _, mt = task_models(CONFIGS["vapt"])
    state = mt.state_dict()
    if damage == "nan":
        state["prompts.birds"] = state["prompts.birds"].clone()
        state["prompts.birds"][5] = torch.nan
    elif damage == "shape":
        state["head_weights.cars"] = state["head_weights.cars"][:, :23]
    elif damage == "missing":
        del state["head_biases.pets"]
    else:
        state["_extra_state"] = {"tasks": ["cars", "cars"]}
    other = vk.MultiTaskVAPT(copy.deepcopy(mt.model))
    other.add_task("dogs", mt.task_state_dict("cars"))
    before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError) as error:
        other.load_state_dict(state)
    assert words in str(error.value)
    assert other.tasks == ["dogs"]
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(
    "config, vit",
    [("vapt", {}), ("per-channel-deep", {}), ("vpt-deep", {}), ("vapt", dict(global_pool="avg"))],
    ids=["vapt", "per-channel-deep", "vpt-deep", "pooling-prompt-outputs"],
)
def test_the_serving_cache_is_never_stale(config, vit):
    """Serving (eval, no gradients) keeps each task's folded matrices and static prompt
    projections; every way a task's parameters or the backbone can change (an optimizer step,
    ``load_state_dict``, an in-place edit, a conversion, a removal and a new task of that name, an
    edit of the backbone, another image size) gives the values an uncached forward computes. An
    edit through ``.data`` is not seen until ``clear_cache()``."""
    models, mt = task_models(CONFIGS[config], dynamic_img_size=True, **vit)
    x, wide = images(mt.model, batch=4), images(mt.model, batch=4, size=(32, 48))
    batch = ["cars", "pets", "cars", "birds"]

    def served(inputs: torch.Tensor = x) -> torch.Tensor:
        mt.eval()
        with torch.no_grad():
            logits = mt(inputs, batch)
        with torch.enable_grad():  # the training path folds afresh
            uncached = mt(inputs, batch).detach()
        padding = torch.isneginf(uncached)
        assert torch.equal(torch.isneginf(logits), padding)
        assert_close_rel(logits[~padding], uncached[~padding], 1e-12, "cached against uncached")
        return logits

    first = served()
    torch.testing.assert_close(served(), first, rtol=0, atol=0)  # from the cache
    served(wide)  # another patch grid: folded for it
    served()

    def sgd_step():
        mt.train()
        step = torch.optim.SGD(mt.parameters(), lr=0.5)
        F.cross_entropy(mt(x, batch), torch.zeros(4, dtype=torch.long)).backward()
        step.step()

    def reload():
        state = {k: v + 0.25 if k.startswith("prompts.") else v for k, v in mt.state_dict().items()}
        mt.load_state_dict(state)

    def edit():
        with torch.no_grad():
            mt.prompts["cars"].mul_(1.5)

    def replace():
        state = mt.task_state_dict("cars")
        mt.remove_task("cars")
        mt.add_task("cars", {k: v * 2 for k, v in state.items()})

    def backbone():
        with torch.no_grad():
            for block in mt.model.blocks:
                block.norm1.weight.mul_(1.25)
                block.attn.qkv.weight.mul_(0.75)

    changes = {"step": sgd_step, "load": reload, "edit": edit, "to": lambda: mt.float().double(), "replace": replace,
               "backbone": backbone}  # fmt: skip
    for what, change in changes.items():
        before = served()
        change()
        after = served()
        assert not torch.equal(before, after), f"{what} changed nothing"
    with torch.no_grad():
        mt.prompts["cars"].data.mul_(3.0)  # invisible to the version counter
    mt.clear_cache()
    served()


def test_compiled_serving_is_not_traced_again_as_tasks_are_added_and_removed():
    """A compiled serving graph reads the table per image: adding and removing tasks does not trace
    it again until the table is rebuilt (when full, or when removed tasks' rows are reclaimed)."""
    from torch._dynamo.testing import CompileCounter

    models, mt = task_models(CONFIGS["vapt"], "torch", torch.float32)
    mt.eval()
    x = images(mt.model, batch=4).float()
    counter = CompileCounter()
    compiled = torch.compile(mt, backend=counter, fullgraph=True)
    state = vk.trainable_state_dict(models["birds"])
    torch._dynamo.reset()
    traces, tables = [], []
    with torch.no_grad():
        for registered in range(3, 40):
            ids = torch.tensor([0, len(mt.tasks) - 1, 1, 2])
            torch.testing.assert_close(compiled(x, ids), mt(x, ids))
            traces.append(counter.frame_count)
            tables.append(id(mt._table))
            mt.add_task(f"t{registered}", state)
            if registered % 4 == 0:  # a removal now and then: the rows left are reclaimed later
                mt.remove_task(f"t{registered - 1}")
    rebuilds = len(set(tables)) - 1  # 4 here: the table grows from 4 rows to hold 31 tasks, and reclaims
    assert rebuilds <= 4 and traces[-1] <= 1 + rebuilds, (traces, rebuilds)


def test_functional_call_computes_with_the_parameters_it_is_given():
    """``torch.func.functional_call`` swaps a task's parameters for the call: the training path and
    the serving path (whose cache sees other tensors) both compute with the given ones."""
    _, mt = task_models(CONFIGS["per-channel-deep"])
    other = vk.MultiTaskVAPT(copy.deepcopy(mt.model))
    for name in mt.tasks:
        other.add_task(name, {k: v * 1.5 for k, v in mt.task_state_dict(name).items()})
    given = {k: v for k, v in other.named_parameters() if k.startswith(("prompts.", "head_"))}
    x = images(mt.model, batch=3)
    batch = ["cars", "birds", "cars"]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(torch.func.functional_call(mt, given, (x, batch)), other(x, batch),
                                       rtol=1e-12, atol=1e-12)  # fmt: skip
    with torch.no_grad():
        assert_serves_from_the_table(mt, x)  # its own values again
