"""The package used as a hostile user would: threads, second-order gradients, torch.func, odd
inputs, pickling, garbage collection, distributed wrappers. Each test names the failure it guards
against; the rule is the right result or a clear error that changes nothing."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import threading
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.attention import SDPBackend, sdpa_kernel

import vapt_kernels as vk
from conftest import (
    FLOAT64_BACKENDS,
    assert_close_rel,
    forward_and_grads,
    images,
    official_parameters,
    oracle_and_grads,
    randomize_prompts,
    tiny_vit,
)
from vapt_kernels import official, ops


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# threads: the patch grid travels with the call
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("sizes", [[(16, 64), (64, 16)], [(32, 48), (32, 32)]], ids=["same-count", "other-count"])
def test_one_model_serves_threads_with_different_image_shapes(backend, sizes):
    """Two image shapes with the same patch count (2x8 and 8x2 grids) used to be computed with
    each other's grid, silently; two with different counts raised spurious errors."""
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True), num_prompts=3, backend=backend)
    randomize_prompts(model)
    inputs = [images(model, size=size, seed=i) for i, size in enumerate(sizes)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    rounds, workers = 20, 4
    barrier = threading.Barrier(workers)
    failures = []

    def work(i: int) -> None:
        x, want = inputs[i % 2], expected[i % 2]
        barrier.wait()
        try:
            for _ in range(rounds):
                with torch.no_grad():
                    got = model(x)
                if not torch.equal(got, want):
                    failures.append(f"thread {i}: max error {(got - want).abs().max().item():.3e}")
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(f"thread {i}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:4]


def test_checkpointed_blocks_recompute_with_their_own_grid():
    """Gradient checkpointing recomputes each block in the backward pass, after another forward
    may have embedded images of another shape (two crops, one loss)."""
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True), num_prompts=3, backend="torch")  # eval: no dropout
    randomize_prompts(model)
    crops = [images(model, size=(16, 64), seed=1), images(model, size=(64, 16), seed=2)]

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.set_grad_checkpointing(checkpointing)
        loss = sum((model(x) * torch.arange(5.0, dtype=x.dtype)).sum() for x in crops)
        return torch.autograd.grad(loss, trainable(model))

    for plain, checkpointed in zip(grads(False), grads(True)):
        assert_close_rel(checkpointed, plain, 1e-12, "gradient with checkpointing")


def test_blocks_called_on_raw_tokens_say_what_to_do():
    model = vk.apply_vapt(tiny_vit(dynamic_img_size=True), num_prompts=2)
    model(images(model, size=(32, 48)))  # this thread last saw a 4x6 grid
    with pytest.raises(ValueError, match="call the model on images"):
        model.blocks[1](torch.randn(1, 1 + 16, 24, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# second-order gradients and torch.func
# --------------------------------------------------------------------------------------------


def _gradient_penalty_grads(loss_fn, x: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ||d loss / d x||^2 with respect to ``params`` (create_graph=True)."""
    x = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    grads = torch.autograd.grad(dx.square().sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS + ["reference"])
def test_second_order_gradients_match_the_official_formulation(backend):
    """create_graph=True (gradient penalty, Hessian-vector products) used to differ from the
    reference on native with only a warning: the kernel backward ops have no derivative."""
    model = vk.apply_vapt(tiny_vit(), num_prompts=3, backend=backend)
    randomize_prompts(model)
    x, params = images(model), trainable(model)
    weights = torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(2, 5)
    got = _gradient_penalty_grads(lambda t: (model(t) * weights).sum(), x, params)
    official_params = official_parameters(model)
    with sdpa_kernel(SDPBackend.MATH):  # timm's attention, twice differentiable
        want = _gradient_penalty_grads(
            lambda t: (official.forward(model, official_params, model.vapt.config, t) * weights).sum(), x, params
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, want):
        assert_close_rel(a, b, 1e-9, f"second-order gradient of {name}")


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_torch_func_grad_vjp_and_vmap_equal_autograd(backend):
    """torch.func.grad/vjp used to fail on every fast backend (old-style autograd.Function, or
    torch.library's generated one) and vmap on torch."""
    model = vk.apply_vapt(tiny_vit(), num_prompts=3, backend=backend)
    randomize_prompts(model)
    x = images(model, batch=3)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, images_):
        return torch.func.functional_call(model, p, (images_,)).square().sum()

    expected = dict(zip(params, torch.autograd.grad(model(x).square().sum(), trainable(model))))
    for name, g in torch.func.grad(loss)(params, x).items():
        assert_close_rel(g, expected[name], 1e-10, f"torch.func.grad of {name}")

    cotangent = torch.randn(3, 5, dtype=torch.float64)
    out, vjp = torch.func.vjp(model, x)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(model(xr), xr, cotangent)
    assert_close_rel(vjp(cotangent)[0], want, 1e-10, "torch.func.vjp")

    # Per-sample gradients: vmap over the batch of grad over one image.
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for i in range(3):
        one = dict(zip(params, torch.autograd.grad(model(x[i : i + 1]).square().sum(), trainable(model))))
        for name in params:
            assert_close_rel(per_sample[name][i], one[name], 1e-10, f"per-sample gradient {i} of {name}")


# --------------------------------------------------------------------------------------------
# odd inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_batch_of_zero_images(backend, mode):
    """A plain timm ViT takes an empty batch; a VAPT model crashed in train mode (torch, native)
    and always on reference."""
    model = vk.apply_vapt(tiny_vit(), num_prompts=3, vpt_depth=2, backend=backend)
    model.train(mode == "train")
    x = torch.zeros(0, 3, 32, 32, dtype=torch.float64)
    for out, grads in (forward_and_grads(model, x, backend), oracle_and_grads(model, x)):
        assert out.shape == (0, 5)
        assert all(g is not None and not g.any() for g in grads.values())


@pytest.mark.parametrize("how", ["half", "autocast"])
def test_auto_runs_float16_on_cpu(how):
    """``auto`` used to pick native for every CPU tensor and fail on float16 (model.half(), fp16
    autocast), which the native CPU kernels do not take: it picks the first backend whose
    contract accepts the inputs."""
    model = vk.apply_vapt(tiny_vit().float(), num_prompts=3, backend="auto")
    randomize_prompts(model)
    x = images(model).float()
    exact = model(x).double()
    if how == "half":
        out = copy.deepcopy(model).half()(x.half())
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
    assert out.dtype == torch.float16
    assert (out.double() - exact).abs().max() / exact.abs().max() < 2e-2
    assert ops.auto_backend("cpu", torch.float16) == "torch"


@pytest.mark.parametrize("config", [10, "num_prompts=4", [("num_prompts", 4)], vk.VAPTConfig])
def test_a_config_of_the_wrong_type_is_refused(config):
    """apply_vapt(model, 10) used to fail with AttributeError: 'int' object has no attribute 'replace'."""
    model = tiny_vit()
    with pytest.raises(TypeError, match="config must be a VAPTConfig, a mapping of its fields"):
        vk.apply_vapt(model, config)
    assert not isinstance(model, vk.timm.VAPTModel) and all(p.requires_grad for p in model.parameters())


def test_a_config_may_be_a_mapping_of_its_fields():
    model = vk.apply_vapt(tiny_vit(), {"num_prompts": 4, "activation": "gelu"}, kernel_size=3)
    assert model.vapt.config == vk.VAPTConfig(num_prompts=4, activation="gelu", kernel_size=3)
    with pytest.raises(TypeError, match="unknown VAPTConfig field.*num_prompt.*valid fields"):
        vk.apply_vapt(tiny_vit(), {"num_prompt": 4})


# --------------------------------------------------------------------------------------------
# pickling, copies, garbage collection, train mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "attention", "identity"])
def test_whole_models_pickle_with_every_activation(activation, tmp_path):
    """attention and identity used to be local lambdas, which pickle refuses."""
    model = vk.apply_vapt(tiny_vit(), num_prompts=2, activation=activation)
    randomize_prompts(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded) is type(model)
    x = images(model)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_models_are_freed_by_reference_counting(no_cyclic_gc):
    """model.train was a partial holding the model: a reference cycle that kept every VAPT model
    alive until the cyclic garbage collector ran."""
    for make in (
        lambda: vk.apply_vapt(tiny_vit(), num_prompts=2),
        lambda: copy.deepcopy(vk.apply_vapt(tiny_vit(), num_prompts=2)),
        lambda: pickle.loads(pickle.dumps(vk.apply_vapt(tiny_vit(dynamic_img_size=True), num_prompts=2))),
    ):
        model = make()
        model(images(model)).sum().backward()
        alive = weakref.ref(model)
        del model
        assert alive() is None, "a VAPT model outlived its last reference"


def _assert_backbone_stays_in_eval(model) -> None:
    module = getattr(model, "_orig_mod", getattr(model, "module", model))
    model.train()
    assert module.vapt.training and module.head.training
    assert not module.blocks[0].training and not module.blocks[0].attn.training and not module.pos_drop.training
    model.eval()
    assert not module.vapt.training


def test_train_mode_keeps_the_backbone_in_eval_through_copies_and_wrappers():
    model = vk.apply_vapt(tiny_vit(), num_prompts=2)
    for twin in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.compile(model)):
        _assert_backbone_stays_in_eval(twin)


def test_the_prompt_parameters_are_read_only_inside_model_vapt():
    """Wrappers that gather parameters around a module's forward (FSDP2's fully_shard) see every
    use of the prompt parameters: the blocks get computed prompts, never the parameters."""
    model = vk.apply_vapt(tiny_vit(), num_prompts=2, vpt_depth=2)
    prompt_ids = {id(p) for p in model.vapt.parameters()}
    seen = []
    model.vapt.register_forward_hook(lambda m, args, out: seen.extend(id(t) for t in out))
    model(images(model))
    assert seen and not prompt_ids & set(seen)


# --------------------------------------------------------------------------------------------
# Triton availability
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_import", ["vapt_kernels.ops.triton", "triton", "timm"])
def test_triton_interpreter_switched_on_too_late_is_reported(first_import):
    """TRITON_INTERPRET=1 set after the Triton kernels (or Triton itself, which timm imports) were
    imported for the GPU used to be reported as available, and the forward then failed inside the
    interpreter."""
    if ops.unavailable_reason("triton") is not None and "not installed" in ops.unavailable_reason("triton"):
        pytest.skip("Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the compiled kernels run on CUDA tensors")
    script = (
        f"import os, torch, {first_import}\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import vapt_kernels as vk\n"
        "print(vk.available_backends()['triton'])\n"
        "x = torch.randn(1, 1, 4, 8)\n"
        "try:\n"
        "    vk.ops.prefix_attention(x, x, x, x, x, 0.5, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reason, error = out.stdout.strip().splitlines()[-2:]
    assert "TRITON_INTERPRET=1 was set after Triton had been imported for the GPU" in reason
    assert "cannot run on cpu tensors" in error and "set it before" in error


# --------------------------------------------------------------------------------------------
# distributed wrappers (two CPU processes, gloo)
# --------------------------------------------------------------------------------------------


WRAPPINGS = ("ddp", "fsdp2-vapt", "fsdp2-root", "fsdp2-blocks-and-root")


def _vapt_for_distributed():
    """The same float32 VAPT model in every process (no dropout: the processes draw other masks)."""
    torch.manual_seed(0)
    config = vk.VAPTConfig(num_prompts=3, vpt_depth=2, conv_dropout=0.0, mlp_dropout=0.0)
    model = vk.apply_vapt(tiny_vit().float(), config, backend="torch")
    randomize_prompts(model)
    return model


def _distributed_worker(rank: int, world: int, folder: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        results = {}
        for wrapping in WRAPPINGS:
            model = _vapt_for_distributed()
            x = images(model, batch=2 * world).float()[2 * rank : 2 * rank + 2]
            wrapped = model
            if wrapping == "ddp":
                wrapped = DistributedDataParallel(model)
            elif wrapping == "fsdp2-vapt":
                fully_shard(model.vapt)
            else:
                if wrapping == "fsdp2-blocks-and-root":
                    for block in model.blocks:
                        fully_shard(block)
                fully_shard(model)
            wrapped.train()
            assert not model.blocks[0].training and model.vapt.training, wrapping
            # Each process's share of the loss; DDP and FSDP2 average the gradients over processes.
            (wrapped(x).square().sum() / (2 * world)).backward()
            results[wrapping] = {}
            for name, p in model.named_parameters():
                # fully_shard(model.vapt) alone averages the prompt gradients only.
                if p.grad is not None and (wrapping != "fsdp2-vapt" or name.startswith("vapt.")):
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    results[wrapping][name] = (g * world).detach().clone()
            del wrapped, model
        for wrapping in MULTITASK_WRAPPINGS:
            mt = _multitask_for_distributed()
            x = images(mt.model, batch=2 * world).float()[2 * rank : 2 * rank + 2]
            tasks = MULTITASK_BATCH[2 * rank : 2 * rank + 2]
            wrapped = DistributedDataParallel(mt) if wrapping == "ddp-multitask" else fully_shard(mt) or mt
            wrapped.train()
            for step in range(2):  # DDP refused the second step when a trainable parameter got no gradient
                mt.zero_grad()
                (wrapped(x, tasks).clamp_min(-1e4).square().sum() / (2 * world)).backward()
            results[wrapping] = {}
            for name, p in mt.named_parameters():
                assert (p.grad is not None) == p.requires_grad, (wrapping, name)
                if p.grad is not None:
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    results[wrapping][name] = (g * world).detach().clone()
            del wrapped, mt
        if rank == 0:
            torch.save(results, f"{folder}/grads.pt")
        # Both processes tear gloo down together, with no wrapped model left holding its work: a
        # process leaving while the other still used the group aborted it (std::terminate).
        dist.barrier()
    finally:
        dist.destroy_process_group()


MULTITASK_WRAPPINGS = ("ddp-multitask", "fsdp2-multitask")
MULTITASK_BATCH = ["b", "a", "a", "b"]


def _multitask_for_distributed() -> vk.MultiTaskVAPT:
    """Two tasks (3 and 5 classes) on :func:`_vapt_for_distributed`'s model, the same in every process."""
    model = _vapt_for_distributed()
    mt = vk.MultiTaskVAPT(model)
    for seed, (name, classes) in enumerate((("a", 3), ("b", 5))):
        torch.manual_seed(seed + 1)
        state = {k: torch.randn_like(v) for k, v in vk.trainable_state_dict(_vapt_for_distributed()).items()}
        state["head.weight"], state["head.bias"] = torch.randn(classes, 24), torch.randn(classes)
        mt.add_task(name, state)
    return mt


@pytest.mark.slow
def test_ddp_and_fsdp2_train_like_one_process(tmp_path):
    """Two processes under DDP and under FSDP2's ``fully_shard`` of ``model.vapt`` alone, of the
    root, and of every block plus the root, against one process on the whole batch.
    ``fully_shard(model.vapt)`` alone used to fail at the first forward (mixed torch.Tensor and
    DTensor): the blocks read the prompt parameters outside ``model.vapt``'s forward."""
    world = 2
    mp.start_processes(_distributed_worker, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")
    results = torch.load(tmp_path / "grads.pt")
    model = _vapt_for_distributed().train()
    x = images(model, batch=2 * world).float()
    (model(x).square().sum() / (2 * world)).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for wrapping in WRAPPINGS:
        names = {n for n in expected if wrapping != "fsdp2-vapt" or n.startswith("vapt.")}
        assert set(results[wrapping]) == names, wrapping
        for name in names:
            assert_close_rel(results[wrapping][name], expected[name], 1e-5, f"gradient of {name} under {wrapping}")
    # A MultiTaskVAPT under DDP and under FSDP2 (its template's own prompts and head frozen).
    mt = _multitask_for_distributed().train()
    x = images(mt.model, batch=2 * world).float()
    (mt(x, MULTITASK_BATCH).clamp_min(-1e4).square().sum() / (2 * world)).backward()
    expected = {n: p.grad for n, p in mt.named_parameters() if p.requires_grad}
    assert expected and all(g is not None for g in expected.values())
    assert not any(n.startswith(("model.vapt.", "model.head.")) for n in expected)
    for wrapping in MULTITASK_WRAPPINGS:
        assert set(results[wrapping]) == set(expected), wrapping
        for name, grad in expected.items():
            assert_close_rel(results[wrapping][name], grad, 1e-5, f"gradient of {name} under {wrapping}")
