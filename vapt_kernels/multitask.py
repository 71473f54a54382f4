"""Many tasks on one backbone: :class:`MultiTaskVAPT` serves and trains batches that mix tasks.

A task is what fine-tuning one VAPT model produces besides the frozen backbone: its prompt
parameters (a ``VAPTPrompts``) and its classifier head. ``MultiTaskVAPT`` keeps one of each per task
next to a single shared backbone and runs a batch whose images belong to different tasks in one
pass: every image is computed exactly as the single-task model of its task would compute it.

How a mixed batch runs (``task`` the batch's task index ``(B,)``, ``K`` the tasks in the batch):

* only the tasks in the batch are read: their parameters are stacked and folded, their heads
  concatenated, so a forward costs what its tasks cost however many are registered, and a task
  absent from a training batch gets no gradient (its ``grad`` stays None: the optimizers skip it);
  a compiled or exported graph, which cannot read the batch's tasks on the host, takes them all;
* adaptive blocks: the tasks' folded prompt matrices, LayerNorm affines and biases are stacked,
  ``(K, Np, N)`` / ``(K, d)``, and ``norm_and_project`` indexes them by ``task`` inside its kernels;
* static prompts (VPT-deep, the first ``vpt_depth`` blocks of VAPT): their keys and values are
  computed once per task, ``(K, H, Np, D)``, then gathered per image for ``prefix_attention``
  (which takes a per-image prefix);
* feature projectors and heads: one batched product over the weights gathered per image (the
  heads: one product over all the tasks' classes, each image keeping its own task's columns).

Dropout draws its masks per image exactly as the single-task model does.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import VAPTConfig
from .modules import Grid, VAPTPrompts, fold_mix, project_features
from .ops.library import check_task_range
from .pretrained import backbone_differences, read_pretrained, warn_if_other_architecture
from .state_dicts import string_keys, validate_then_copy
from .timm import embed_tokens, prompts_of

Tasks = Union[Sequence[str], torch.Tensor]


class MultiTaskVAPT(nn.Module):
    """One frozen VAPT backbone serving and training many tasks, in batches that mix them.

    Args:
        model: a VAPT model (:func:`vapt_kernels.apply_vapt` or :func:`vapt_kernels.apply_vpt`)
            with a linear head. Its backbone, VAPT configuration and backend are shared by every
            task. Its own prompts and head are not a task: they are frozen here
            (``requires_grad=False``), so that every trainable parameter of a ``MultiTaskVAPT``
            gets a gradient, as DDP requires. To go on training the model alone, pass a copy.

    Example::

        mt = vk.MultiTaskVAPT(model)
        mt.add_task("pets", vk.trainable_state_dict(pets_model))
        mt.add_task("cars", "runs/cars/pretrained")   # a folder save_pretrained or vapt-train wrote
        logits = mt(images, ["pets", "cars", "pets"])   # (3, max classes), -inf past a task's own
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        caller = "MultiTaskVAPT"
        prompts_of(model, caller)
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or model.get_classifier() is not head:
            raise TypeError(
                f"{caller}: the model's classifier must be one nn.Linear at model.head, got "
                f"{type(model.get_classifier()).__name__}; build the model with num_classes > 0 and no "
                "distillation head"
            )
        for p in [*model.vapt.parameters(), *head.parameters()]:
            p.requires_grad_(False)
        self.model = model
        self.prompts = nn.ModuleDict()  # task name -> VAPTPrompts
        self.heads = nn.ModuleDict()  # task name -> nn.Linear
        # The task order (indices), each task's position in it (rebuilt after a removal, when
        # first needed), and how many tasks have each class count (for the padded width).
        self._order: list[str] = []
        self._positions: Optional[dict[str, int]] = {}
        self._class_count_tally: dict[int, int] = {}
        # Each task's class count, by index, on the model's device (read per forward without a
        # host copy); its length doubles as tasks are added, so an add is O(1) amortized.
        device = model.head.weight.device
        self.register_buffer("class_counts", torch.zeros(4, dtype=torch.long, device=device), persistent=False)
        self.train(model.training)

    @property
    def config(self) -> VAPTConfig:
        return self.model.vapt.config

    @property
    def tasks(self) -> list[str]:
        """The task names, in the order they were added (a task's index is its position here)."""
        return list(self._order)

    @property
    def max_classes(self) -> int:
        """The width of the logits: the most classes of any task."""
        return max(self._class_count_tally, default=0)

    # --------------------------------------------------------------------------------------------
    # tasks
    # --------------------------------------------------------------------------------------------

    def add_task(self, name: str, state: Union[Mapping[str, torch.Tensor], str, "os.PathLike[str]"]) -> None:
        """Add a task from the trainable state dict of a single-task model, or from the folder
        :func:`vapt_kernels.save_pretrained` (or ``vapt-train``) saved it in.

        Args:
            name: a new task name (a non-empty printable string without ``.``, not an attribute
                of ``nn.ModuleDict`` such as ``keys``).
            state: :func:`vapt_kernels.trainable_state_dict` of a model with this backbone and
                VAPT configuration, or the path of a saved folder (whose configuration, dropout
                rates and activation included, and backbone shapes must be the model's); its
                head may have its own number of classes.

        Raises:
            TypeError: ``state`` is neither a mapping nor a path.
            FileNotFoundError: no saved folder at that path.
            ValueError: a name in use or not usable; a folder that is not a saved task; a task
                of another VAPT configuration (naming the fields that differ) or backbone, with
                missing or unexpected keys, a head without classes, or invalid values. Nothing
                is changed then.

        Warns:
            UserWarning: a saved folder's timm architecture name is not the model's.
        """
        caller = "MultiTaskVAPT.add_task"
        if not isinstance(name, str) or not name or "." in name or not name.isprintable():
            raise ValueError(
                f"{caller}: a task name must be a non-empty printable string without '.', got {name!r}"
            )
        if name in self.prompts:
            raise ValueError(f"{caller}: there is already a task {name!r}; remove_task({name!r}) first to replace it")
        if hasattr(self.prompts, name):  # nn.ModuleDict's own attributes (training, keys, update, ...)
            raise ValueError(f"{caller}: {name!r} is reserved (an attribute of nn.ModuleDict); choose another name")
        if isinstance(state, (str, os.PathLike)):
            state = self._read_task_folder(state, caller)
        problems: list[str] = []
        keys = string_keys(caller, state, problems)
        prompts = copy.deepcopy(self.model.vapt)
        prompts.requires_grad_(True)
        template = self.model.head
        weight = state.get("head.weight")
        no_classes = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == 0
        if no_classes:
            problems.append("head.weight: the head has no classes (num_classes=0); a task needs at least one")
        sized = isinstance(weight, torch.Tensor) and weight.dim() == 2 and not no_classes
        classes = weight.shape[0] if sized else template.out_features
        dd = {"device": template.weight.device, "dtype": template.weight.dtype}
        head = nn.Linear(template.in_features, classes, bias=template.bias is not None, **dd)
        targets = {f"vapt.{k}": p for k, p in prompts.named_parameters()}
        targets.update({f"head.{k}": p for k, p in head.named_parameters()})
        missing = sorted(set(targets) - set(keys))
        unexpected = sorted(set(keys) - set(targets))
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        differences = _config_differences(state, self.model)
        if differences:
            problems.insert(0, "saved from another VAPT configuration than the model's: " + "; ".join(differences))
        hint = (
            f"Every task shares the model's backbone and VAPT configuration ({self.config}); pass "
            "vapt_kernels.trainable_state_dict of a model built like it."
        )
        present = {k: p for k, p in targets.items() if k in state}
        validate_then_copy(caller, state, present, problems, hint, "state dict")
        prompts.train(self.training)
        head.train(self.training)
        index = len(self._order)
        if index == len(self.class_counts):
            grown = torch.zeros(2 * index, dtype=torch.long, device=self.class_counts.device)
            grown[:index] = self.class_counts
            self.class_counts = grown
        self.class_counts[index] = classes
        self.prompts[name] = prompts
        self.heads[name] = head
        self._order.append(name)
        if self._positions is not None:
            self._positions[name] = index
        self._class_count_tally[classes] = self._class_count_tally.get(classes, 0) + 1

    def _read_task_folder(self, path, caller: str) -> dict[str, torch.Tensor]:
        """The parameters of a saved folder, once its configuration and backbone are the model's."""
        saved = read_pretrained(path, caller)
        differences = [
            f"{f.name}: saved {getattr(saved.config, f.name)!r}, model {getattr(self.config, f.name)!r}"
            for f in dataclasses.fields(VAPTConfig)
            if getattr(saved.config, f.name) != getattr(self.config, f.name)
        ]
        differences += backbone_differences(saved.backbone, self.model)
        if differences:
            raise ValueError(
                f"{caller}: {saved.path} was saved with another VAPT configuration or backbone than the model's: "
                f"{'; '.join(differences)}. Every task shares the model's backbone and configuration"
            )
        warn_if_other_architecture(saved, self.model, caller)
        return saved.state

    def remove_task(self, name: str) -> None:
        """Remove a task; the other tasks' parameters are untouched."""
        self._check_name(name, "MultiTaskVAPT.remove_task")
        index = self._order.index(name)
        count = self.heads[name].out_features
        del self.prompts[name]
        del self.heads[name]
        del self._order[index]
        self._positions = None  # the later tasks moved up one place
        self._class_count_tally[count] -= 1
        if not self._class_count_tally[count]:
            del self._class_count_tally[count]
        end = len(self._order)
        self.class_counts[index:end] = self.class_counts[index + 1 : end + 1].clone()

    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Copies of task ``name``'s parameters, keyed as :func:`vapt_kernels.trainable_state_dict`
        keys a single-task model's: load them into one with
        :func:`vapt_kernels.load_trainable_state_dict`."""
        self._check_name(name, "MultiTaskVAPT.task_state_dict")
        state = {f"vapt.{k}": p.detach().clone() for k, p in self.prompts[name].named_parameters()}
        state.update({f"head.{k}": p.detach().clone() for k, p in self.heads[name].named_parameters()})
        return state

    def _position(self) -> dict[str, int]:
        if self._positions is None:
            self._positions = {name: i for i, name in enumerate(self._order)}
        return self._positions

    def _check_name(self, name: str, caller: str) -> None:
        if name not in self.prompts:
            known = ", ".join(map(repr, self.prompts)) or "none yet"
            raise KeyError(f"{caller}: no task {name!r}; the tasks are: {known}")

    # --------------------------------------------------------------------------------------------
    # forward
    # --------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "MultiTaskVAPT":
        """Task prompts and heads follow ``mode``; the frozen backbone stays in eval mode."""
        nn.Module.train(self, mode)
        self.model.train(mode)  # the VAPT model's own rule: backbone in eval, head dropout follows
        return self

    def task_index(self, tasks: Tasks, batch: int, device: torch.device) -> torch.Tensor:
        """``tasks`` (``batch`` names, or a ``(batch,)`` integer tensor of task indices in the
        order of :attr:`tasks`) as an int64 index on ``device``, checked."""
        caller = "MultiTaskVAPT"
        if not self.prompts:
            raise RuntimeError(f"{caller}: there are no tasks yet; add one with add_task(name, state)")
        if isinstance(tasks, torch.Tensor):
            if tasks.shape != (batch,) or tasks.is_floating_point() or tasks.is_complex() or tasks.dtype == torch.bool:
                raise ValueError(
                    f"{caller}: a task tensor must be an integer (B,) = ({batch},) tensor of task indices, got "
                    f"{tasks.dtype} {tuple(tasks.shape)}"
                )
            index = tasks.to(device=device, dtype=torch.long)
            check_task_range(index, len(self._order), f"{caller}: task")
            return index
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise TypeError(
                f"{caller}: tasks must be a list of {batch} task names or a LongTensor ({batch},) of task indices, "
                f"got {type(tasks).__name__}"
            )
        if len(tasks) != batch:
            raise ValueError(f"{caller}: got {len(tasks)} task names for a batch of {batch} images; give one per image")
        position = self._position()
        unknown = sorted({repr(t) for t in tasks if not isinstance(t, str) or t not in position})
        if unknown:
            raise KeyError(f"{caller}: unknown task(s) {', '.join(unknown)}; the tasks are: {', '.join(self._order)}")
        return torch.tensor([position[t] for t in tasks], dtype=torch.long, device=device)

    def forward(self, images: torch.Tensor, tasks: Tasks) -> torch.Tensor:
        """Logits ``(B, C_max)`` of a batch mixing tasks: row ``i`` holds task ``tasks[i]``'s
        logits in its first ``C_t`` entries and ``-inf`` after them (so softmax, argmax and
        cross-entropy see the task's own logits).

        Args:
            images: ``(B, 3, H, W)``, as the model takes them.
            tasks: the task of each image: ``B`` names, or an integer ``(B,)`` tensor of indices
                into :attr:`tasks` (what a compiled or exported model takes).
        """
        if images.dim() != 4:
            raise ValueError(f"MultiTaskVAPT: images must be (B, C, H, W), got shape {tuple(images.shape)}")
        task = self.task_index(tasks, images.shape[0], images.device)
        present, index, local = self._present(tasks, task)
        model = self.model
        x = embed_tokens(model, images)
        prompts = _TaskPrompts([self.prompts[self._order[t]] for t in present], local)
        for block in model.blocks:
            grid, num_prefix = block.patch_grid(x), block.num_prefix_tokens
            h, p, p_index = prompts.block(block.vapt_index, x, block.norm1, num_prefix, grid, block.backend)
            x = block.forward_prompted(x, h, p, p_index)
        features = model.forward_head(model.norm(x), pre_logits=True)
        return self._logits(features, present, index, local)

    def _present(self, tasks: Tasks, task: torch.Tensor) -> tuple[list[int], Optional[torch.Tensor], torch.Tensor]:
        """The indices of the tasks in the batch (sorted; as a list, and as a tensor on the batch's
        device, None when they are all the tasks) and each image's place among them: a
        forward stacks and folds those tasks' parameters only, so its cost grows with the tasks in
        the batch, not the tasks registered, and a task absent from a training batch gets no
        gradient (``grad`` stays None, so the optimizers skip it: no weight decay, no momentum).
        A compiled or exported graph cannot read the batch's tasks on the host: it takes every
        task, each image its own."""
        if torch.compiler.is_compiling():
            return list(range(len(self._order))), None, task
        if isinstance(tasks, torch.Tensor):
            index = torch.unique(task)  # sorted; the one host read of a forward given indices
            return index.tolist(), index, torch.searchsorted(index, task)
        position = self._position()
        present = sorted({position[name] for name in tasks})
        place = {t: i for i, t in enumerate(present)}
        local = torch.tensor([place[position[name]] for name in tasks], dtype=torch.long, device=task.device)
        return present, torch.tensor(present, dtype=torch.long, device=task.device), local

    def _logits(
        self, features: torch.Tensor, present: list[int], index: Optional[torch.Tensor], local: torch.Tensor
    ) -> torch.Tensor:
        """The heads of the tasks in the batch as one product over their concatenated classes,
        each image keeping its own task's columns, padded with ``-inf`` to :attr:`max_classes`."""
        heads = [self.heads[self._order[t]] for t in present]
        weight = torch.cat([head.weight for head in heads])
        bias = torch.cat([head.bias for head in heads]) if heads[0].bias is not None else None
        every = F.linear(features, weight, bias)  # (B, sum of the present tasks' classes)
        counts = self.class_counts[: len(self._order)] if index is None else self.class_counts[index]
        starts = torch.cumsum(counts, 0) - counts
        mine = counts[local, None]  # (B, 1)
        cols = torch.arange(self.max_classes, device=features.device)
        own = torch.gather(every, 1, starts[local, None] + torch.minimum(cols, mine - 1))
        return own.masked_fill(cols >= mine, float("-inf"))


class _TaskPrompts:
    """The prompts of every block for a batch whose image ``b`` belongs to task ``task[b]``, from
    the tasks' ``VAPTPrompts`` (one configuration): the mixed-batch twin of
    :meth:`VAPTPrompts.forward`."""

    def __init__(self, tasks: list[VAPTPrompts], task: torch.Tensor) -> None:
        self.tasks, self.task, self.first = tasks, task, tasks[0]
        # Projector j's weights gathered per image, once per forward (a shared projector serves
        # every adaptive block).
        self.projector_weights: dict[int, tuple] = {}

    @staticmethod
    def stack(modules: list[nn.Module], get) -> Optional[torch.Tensor]:
        """``get(module)`` of every task stacked, ``(K, ...)``; None where the modules have none."""
        values = [get(m) for m in modules]
        return None if values[0] is None else torch.stack(values)

    def block(
        self, index: int, x: torch.Tensor, norm1: nn.LayerNorm, num_prefix: int, grid: Grid, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Block ``index``'s ``h = norm1(x)``, prompt rows and the index of each image's row:
        ``(B, Np, d)`` with index None, or the static prompts ``(K, Np, d)`` with index ``task``."""
        config = self.first.config
        if self.first.is_static(index):
            rows = self.stack(self.tasks, lambda m: m.prompt[0] if index == 0 else m.deep_prompts[index - 1])
            if self.first.training and config.prompt_dropout > 0.0:
                return norm1(x), F.dropout(rows[self.task], config.prompt_dropout, True), None
            return norm1(x), rows, self.task
        gens = [t.generator(index) for t in self.tasks]
        gen = gens[0]
        token_weight = self.stack(gens, lambda m: m.token_proj.weight)
        mix = fold_mix(token_weight, self.stack(gens, lambda m: m.kernel), config, gen.grid, grid)
        h, g = ops.norm_and_project(
            x, norm1.weight, norm1.bias, norm1.eps, self.stack(gens, lambda m: m.norm.weight),
            self.stack(gens, lambda m: m.norm.bias), gen.norm.eps, mix, num_prefix, backend=backend, task=self.task,
        )  # fmt: skip
        mask = gen.channel_mask(x.shape[0], g)  # the tasks share the dropout rate: any generator draws it
        if mask is not None:
            g = g * mask
        g = g + self.stack(gens, lambda m: m.token_proj.bias)[self.task].unsqueeze(-1)
        return h, self.project(index, g), None

    def project(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Each image's task's feature projector on ``G (B, Np, d)``, as batched products over the
        weights gathered per image."""
        if not len(self.first.projectors):
            return g
        j = 0 if self.first.config.share_projector else index - self.first.config.vpt_depth
        projectors = [t.projectors[j] for t in self.tasks]
        first = projectors[0]
        if j not in self.projector_weights:
            self.projector_weights[j] = (
                self.stack(projectors, lambda m: m.fc1.weight)[self.task].transpose(1, 2),  # (B, d, r)
                self.stack(projectors, lambda m: m.fc2.weight)[self.task].transpose(1, 2),  # (B, r, d)
                None if first.scale is None else self.stack(projectors, lambda m: m.scale)[self.task].unsqueeze(-1),
            )
        fc1_t, fc2_t, scale = self.projector_weights[j]
        return project_features(
            g, lambda t: torch.bmm(t, fc1_t), lambda t: torch.bmm(t, fc2_t), scale, first.activation, first.dropout,
            first.training,
        )


def _config_differences(state: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """The VAPT configuration fields a trainable state dict was visibly saved with that differ from
    ``model``'s, each as ``"field: state dict X, model Y"`` (what the shapes and keys reveal;
    dropout rates and activations leave no trace)."""
    config = model.vapt.config
    seen = _config_of_state(state, len(model.blocks), tuple(model.patch_embed.grid_size), config)
    # A model without adaptive blocks (VPT-deep) has no generator, so their fields mean nothing there.
    moot = () if len(model.vapt.generators) else ("conv", "shared_kernel", "kernel_size", "padding", "feature_projector")
    return [
        f"{f}: state dict {v}, model {getattr(config, f)}"
        for f, v in seen.items()
        if f not in moot and v != getattr(config, f)
    ]


def _config_of_state(state: Mapping[str, torch.Tensor], depth: int, grid: Grid, config: VAPTConfig) -> dict:
    """The VAPT fields a trainable state dict reveals through its keys and shapes."""

    def shape(key: str) -> Optional[tuple[int, ...]]:
        value = state.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    seen: dict[str, object] = {}
    prompt = shape("vapt.prompt")
    if prompt is not None and len(prompt) == 3:
        seen["num_prompts"] = prompt[1]
    deep = shape("vapt.deep_prompts")
    seen["vpt_depth"] = 1 + (deep[0] if deep else 0)
    if not any(k.startswith("vapt.generators.") for k in state if isinstance(k, str)):
        return seen
    kernel = shape("vapt.generators.0.kernel")
    seen["conv"] = kernel is not None
    if kernel is not None and len(kernel) == 4:
        seen["shared_kernel"] = kernel[0] == 1
        seen["kernel_size"] = kernel[-1]
    token = shape("vapt.generators.0.token_proj.weight")
    if token is not None and len(token) == 2 and kernel is not None:
        k = seen.get("kernel_size", config.kernel_size)
        fits = [p for p in range(64) if (grid[0] + 2 * p - k + 1) * (grid[1] + 2 * p - k + 1) == token[1]]
        if fits:
            seen["padding"] = fits[0]
    projectors = {k.split(".")[2] for k in state if isinstance(k, str) and k.startswith("vapt.projectors.")}
    seen["feature_projector"] = bool(projectors)
    if projectors:
        adaptive = depth - seen["vpt_depth"]
        if adaptive > 1:
            seen["share_projector"] = len(projectors) == 1
        fc1 = shape("vapt.projectors.0.fc1.weight")
        if fc1 is not None and len(fc1) == 2:
            seen["hidden_dim"] = fc1[0]
        seen["learnable_scale"] = "vapt.projectors.0.scale" in state
    return seen
