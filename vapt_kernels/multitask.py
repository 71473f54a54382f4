"""Many tasks on one backbone: :class:`MultiTaskVAPT` serves and trains batches that mix tasks.

A task is what fine-tuning one VAPT model produces besides the frozen backbone: its prompt
parameters and its classifier head. ``MultiTaskVAPT`` keeps every task's values in one table per
kind (the prompts, a row per task; the head weights and biases, a run of rows per task) next to a
single shared backbone, and runs a batch whose images belong to different tasks in one pass: every
image is computed exactly as the single-task model of its task would compute it.

How a mixed batch runs (``task`` the batch's task index ``(B,)``, ``K`` the tasks in the batch):

* only the tasks in the batch are read: their prompt rows are stacked and their generators
  folded, their heads concatenated, so a forward costs what its tasks cost however many are
  registered, and a task absent from a training batch gets no gradient (its ``grad`` stays None:
  the optimizers skip it); serving (no gradients) takes the folds from a cache that notices any
  change of a task's parameters; a compiled or exported serving graph reads each image's rows of
  the table;
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

import dataclasses
import itertools
import os
from collections import OrderedDict
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
from .state_dicts import plain_values, string_keys, validate_then_copy
from .timm import PromptProjections, embed_tokens, prompts_of

Tasks = Union[Sequence[str], torch.Tensor]


class MultiTaskVAPT(nn.Module):
    """One frozen VAPT backbone serving and training many tasks, in batches that mix them.

    Args:
        model: a VAPT model (:func:`vapt_kernels.apply_vapt` or :func:`vapt_kernels.apply_vpt`)
            with a linear head. Its backbone, VAPT configuration and backend are shared by every
            task. Its own prompts and head are not a task: they are frozen here
            (``requires_grad=False``), so that every trainable parameter of a ``MultiTaskVAPT``
            gets a gradient, as DDP requires. To go on training the model alone, pass a copy.

    A task's parameters are three: ``prompts[name]`` (its prompt parameters flattened, ``(P,)``),
    ``head_weights[name]`` ``(C_t, d)`` and ``head_biases[name]`` ``(C_t,)`` (when the model's head
    has a bias). Each is a view of its task's rows in the task table, which holds every task's
    values in three tensors, one per kind (docs/design.md §2.4).

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
        self.prompts = nn.ParameterDict()  # task name -> its prompt parameters, (P,) (_Layout)
        self.head_weights = nn.ParameterDict()  # task name -> (C_t, d)
        self.head_biases = nn.ParameterDict()  # task name -> (C_t,), when the head has a bias
        self._layout = _Layout(model.vapt)
        self._table = _TaskTable.empty(self._layout.width, head.in_features, head.bias is not None, head.weight)
        # The task order (indices), each task's position in it (rebuilt after a removal, when
        # first needed), each task's rows in the table, and how many tasks have each class count.
        self._order: list[str] = []
        self._positions: Optional[dict[str, int]] = {}
        self._rows: dict[str, _Rows] = {}
        self._class_count_tally: dict[int, int] = {}
        self._max_classes = 0
        # The serving cache (_served): (task, what) -> (stamp, value); each add gets a new serial,
        # so a task removed and added again under its name never matches the old one's stamps.
        self._cache: OrderedDict[tuple[str, object], tuple[tuple, object]] = OrderedDict()
        self._cache_bytes = 0
        self._serials: dict[str, int] = {}
        self._next_serial = 0
        self.serving_cache_bytes = 256 * 2**20
        # By task index, on the model's device (read per forward without a host copy): its prompt
        # row, first class row and class count; as long as the prompt table, rebuilt with it.
        device = head.weight.device
        self.register_buffer("task_rows", torch.zeros(4, 3, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("num_tasks", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_load_state_dict_post_hook(_rebuild_after_load)
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
        return self._max_classes

    # --------------------------------------------------------------------------------------------
    # tasks
    # --------------------------------------------------------------------------------------------

    def add_task(self, name: str, state: Union[Mapping[str, torch.Tensor], str, "os.PathLike[str]"]) -> None:
        """Add a task from the trainable state dict of a single-task model, or from the folder
        :func:`vapt_kernels.save_pretrained` (or ``vapt-train``) saved it in.

        Args:
            name: a new task name (a non-empty printable string without ``.``, not an attribute
                of ``nn.ParameterDict`` such as ``keys``).
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
        self._check_new_name(name, caller)
        if isinstance(state, (str, os.PathLike)):
            state = self._read_task_folder(state, caller)
        problems: list[str] = []
        keys = string_keys(caller, state, problems)
        weight = state.get("head.weight")
        no_classes = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == 0
        if no_classes:
            problems.append("head.weight: the head has no classes (num_classes=0); a task needs at least one")
        sized = isinstance(weight, torch.Tensor) and weight.dim() == 2 and not no_classes
        classes = weight.shape[0] if sized else self.model.head.out_features
        # The values are checked and copied into the rows the task will own, past the rows in
        # use: a refused task leaves every task's values and rows as they were.
        self._make_room(1, classes)
        rows = _Rows(self._table.prompt_end, self._table.class_end, classes)
        shapes = self._shapes(classes)
        missing = sorted(set(shapes) - set(keys))
        unexpected = sorted(set(keys) - set(shapes))
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        differences = _config_differences(state, self.model)
        if differences:
            problems.insert(0, "saved from another VAPT configuration than the model's: " + "; ".join(differences))
        if problems or not self._copy_checked_at_once(state, rows, shapes):
            hint = (
                f"Every task shares the model's backbone and VAPT configuration ({self.config}); pass "
                "vapt_kernels.trainable_state_dict of a model built like it."
            )
            present = {k: v for k, v in self._views(rows).items() if k in state}
            validate_then_copy(caller, state, present, problems, hint, "state dict")
        self._table.prompt_end += 1
        self._table.class_end += classes
        self._register(name, rows)

    def _check_new_name(self, name: object, caller: str) -> None:
        if isinstance(name, str) and name in self._rows:
            raise ValueError(f"{caller}: there is already a task {name!r}; remove_task({name!r}) first to replace it")
        problem = _name_problem(name)
        if problem is not None:
            raise ValueError(f"{caller}: {problem}")

    def _shapes(self, classes: int) -> dict[str, tuple[int, ...]]:
        """The shape of each value of a task of ``classes`` classes, keyed as
        :func:`vapt_kernels.trainable_state_dict` keys a single-task model's."""
        shapes = {f"vapt.{k}": tuple(shape) for k, (_, shape) in self._layout.slots.items()}
        shapes["head.weight"] = (classes, self._table.weight.shape[1])
        if self._table.bias is not None:
            shapes["head.bias"] = (classes,)
        return shapes

    def _copy_checked_at_once(self, state: Mapping[str, torch.Tensor], rows: "_Rows", shapes: dict) -> bool:
        """Copy a task's values into its new rows when each is a plain tensor of its shape
        (:func:`plain_values`), then check the rows' finiteness through their sum: what
        :func:`validate_then_copy` checks value by value, in three copies and a sum (most of an
        add's cost). False when something is wrong: the value-by-value check then names it."""
        if not plain_values(state, shapes):
            return False
        row, weight, bias = self._table.windows(rows)
        with torch.no_grad():
            row.copy_(torch.cat([state[f"vapt.{k}"].reshape(-1) for k in self._layout.slots]))
            weight.copy_(state["head.weight"])
            total = row.sum() + weight.sum()
            if bias is not None:
                bias.copy_(state["head.bias"])
                total += bias.sum()
        # A NaN or an infinity makes the sum non-finite; so may a sum of large finite values,
        # which the value-by-value check then finds valid.
        return bool(torch.isfinite(total))

    def _views(self, rows: "_Rows") -> dict[str, torch.Tensor]:
        """The task's values as views of its rows in the table, keyed as
        :func:`vapt_kernels.trainable_state_dict` keys a single-task model's."""
        row, weight, bias = self._table.windows(rows)
        views = {f"vapt.{k}": v for k, v in self._layout.views(row).items()}
        views["head.weight"] = weight
        if bias is not None:
            views["head.bias"] = bias
        return views

    def _register(self, name: str, rows: "_Rows") -> None:
        """Make ``name`` a task whose values lie in ``rows`` of the table: its parameters, its
        index (the next), its rows by index."""
        index = len(self._order)
        row, weight, bias = self._table.windows(rows)
        self.prompts[name] = _window(row)
        self.head_weights[name] = _window(weight)
        if bias is not None:
            self.head_biases[name] = _window(bias)
        self.task_rows[index] = torch.tensor(rows.index_entry(), dtype=torch.long)
        self.num_tasks.fill_(index + 1)
        self._order.append(name)
        if self._positions is not None:
            self._positions[name] = index
        self._rows[name] = rows
        self._serials[name], self._next_serial = self._next_serial, self._next_serial + 1
        self._class_count_tally[rows.count] = self._class_count_tally.get(rows.count, 0) + 1
        self._max_classes = max(self._max_classes, rows.count)

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
        """Remove a task; the other tasks' values are untouched (their rows may move when the
        table reclaims the rows of removed tasks, their values never change)."""
        self._check_name(name, "MultiTaskVAPT.remove_task")
        index = self._order.index(name)
        rows = self._rows.pop(name)
        del self.prompts[name]
        del self.head_weights[name]
        if name in self.head_biases:
            del self.head_biases[name]
        del self._serials[name]  # its cache entries are never matched again, and age out
        del self._order[index]
        self._positions = None  # the later tasks moved up one place
        self._class_count_tally[rows.count] -= 1
        if not self._class_count_tally[rows.count]:
            del self._class_count_tally[rows.count]
            self._max_classes = max(self._class_count_tally, default=0)
        end = len(self._order)
        self.task_rows[index:end] = self.task_rows[index + 1 : end + 1].clone()
        self.num_tasks.fill_(end)
        table = self._table
        table.unused_prompts += 1
        table.unused_classes += rows.count
        if table.unused_prompts > end or table.unused_classes > table.class_end - table.unused_classes:
            self._rebuild_table()

    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Copies of task ``name``'s parameters, keyed as :func:`vapt_kernels.trainable_state_dict`
        keys a single-task model's: load them into one with
        :func:`vapt_kernels.load_trainable_state_dict`."""
        self._check_name(name, "MultiTaskVAPT.task_state_dict")
        state = {f"vapt.{k}": v.detach().clone() for k, v in self._layout.views(self.prompts[name]).items()}
        state["head.weight"] = self.head_weights[name].detach().clone()
        if name in self.head_biases:
            state["head.bias"] = self.head_biases[name].detach().clone()
        return state

    def _position(self) -> dict[str, int]:
        if self._positions is None:
            self._positions = {name: i for i, name in enumerate(self._order)}
        return self._positions

    def _check_name(self, name: str, caller: str) -> None:
        if name not in self._rows:
            known = ", ".join(map(repr, self._order)) or "none yet"
            raise KeyError(f"{caller}: no task {name!r}; the tasks are: {known}")

    # --------------------------------------------------------------------------------------------
    # the task table
    # --------------------------------------------------------------------------------------------

    def _make_room(self, prompts: int, classes: int) -> None:
        """Room in the table for ``prompts`` more tasks of ``classes`` classes in all past the rows
        in use: when there is none, the table is rebuilt with twice the rows its tasks need."""
        table = self._table
        if table.prompt_end + prompts > len(table.prompts) or table.class_end + classes > len(table.weight):
            self._rebuild_table(prompts, classes)

    def _rebuild_table(self, more_prompts: int = 0, more_classes: int = 0, like: Optional[torch.Tensor] = None) -> None:
        """Rebuild the table from the tasks' parameters, in task order, without the rows of
        removed tasks and with room for twice what the tasks (and ``more_*``) need, and point
        every task's parameters at their new rows. An add that finds the table full, a removal
        that leaves more rows unused than in use, a conversion (``.to``), a copy and a load
        rebuild it: O(tasks) each time, at most once per as many adds or removes, so O(1)
        amortized."""
        old, names = self._table, self._order
        if like is None:
            like = self.prompts[names[0]] if names else old.prompts
        counts = [self._rows[n].count for n in names]
        table = _TaskTable.like(old, like, 2 * (len(names) + more_prompts), 2 * (sum(counts) + more_classes))
        entries = []
        with torch.no_grad():
            if names:
                table.prompts[: len(names)] = torch.stack([self.prompts[n] for n in names])
                table.weight[: sum(counts)] = torch.cat([self.head_weights[n] for n in names])
                if table.bias is not None:
                    table.bias[: sum(counts)] = torch.cat([self.head_biases[n] for n in names])
        self._table = table
        for i, name in enumerate(names):
            rows = _Rows(i, table.class_end, counts[i])
            table.prompt_end, table.class_end = i + 1, table.class_end + counts[i]
            self._rows[name] = rows
            entries.append(rows.index_entry())
            row, weight, bias = table.windows(rows)
            self.prompts[name].data = row
            self.head_weights[name].data = weight
            if bias is not None:
                self.head_biases[name].data = bias
        spans = torch.zeros(len(table.prompts), 3, dtype=torch.long)
        spans[: len(entries)] = torch.tensor(entries, dtype=torch.long).reshape(-1, 3)
        self.task_rows = spans.to(self.task_rows.device)
        # The old table's storage is free now and may be handed out again at the same address,
        # which a stamp's data pointer could not tell from the task's old values: start afresh.
        self.clear_cache()

    def _clear(self) -> None:
        """No task left (before a load gives the model the saved ones)."""
        for name in self._order:
            for parameters in (self.prompts, self.head_weights, self.head_biases):
                if name in parameters:
                    del parameters[name]
        self._order, self._positions, self._rows, self._class_count_tally, self._serials = [], {}, {}, {}, {}
        self._max_classes = 0
        self.clear_cache()
        self.num_tasks.fill_(0)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.double()``, ...: the tasks' parameters are converted one by
        one, which gives each its own storage; the table is rebuilt from them."""
        super()._apply(fn, recurse)
        self._rebuild_table(like=None if self._order else fn(self._table.prompts))
        return self

    def __getstate__(self) -> dict:
        """What a copy (``copy.deepcopy``, pickling) takes: the table's values are the parameters'
        (copied on their own), so it takes an empty table and no cached values."""
        state = self.__dict__.copy()
        state["_table"] = _TaskTable.like(self._table, self._table.prompts, 0, 0)
        state["_cache"], state["_cache_bytes"] = OrderedDict(), 0
        return state

    def __setstate__(self, state) -> None:
        """A copy (``copy.deepcopy``, pickling) copies each parameter on its own: the table is
        rebuilt from them."""
        super().__setstate__(state)
        self._rebuild_table()

    def get_extra_state(self) -> dict:
        """The task names in order, saved in ``state_dict()`` next to their values (``prompts.<name>``,
        ``head_weights.<name>``, ``head_biases.<name>``)."""
        return {"tasks": list(self._order)}

    def set_extra_state(self, state) -> None:
        """Nothing: :meth:`_load_from_state_dict` made the saved tasks the model's before."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """A state dict with the saved task list (``state_dict()`` of a ``MultiTaskVAPT``) gives the
        model exactly its tasks, in its order, whatever tasks the model held: every value is checked
        first, and nothing changes if one is wrong. One without the list loads by name, as
        ``nn.Module`` does."""
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None:
            self._load_tasks(saved, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _load_tasks(self, saved, state_dict, prefix: str) -> None:
        caller = "MultiTaskVAPT.load_state_dict"
        names = saved.get("tasks") if isinstance(saved, Mapping) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(
                f"{caller}: {prefix}_extra_state must be {{'tasks': [distinct task names]}}, as "
                f"MultiTaskVAPT.state_dict() saves it; got {saved!r:.200}"
            )
        problems: list[str] = []
        counts = []
        for name in names:
            weight = state_dict.get(f"{prefix}head_weights.{name}")
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
                got = "missing" if weight is None else f"{type(weight).__name__} {tuple(getattr(weight, 'shape', ()))}"
                problems.append(f"{prefix}head_weights.{name}: task {name!r}'s head must be a (classes, d) tensor, got {got}")
                counts.append(1)
            else:
                counts.append(weight.shape[0])
        table = _TaskTable.like(self._table, self._table.prompts, 2 * len(names), 2 * sum(counts))
        starts = [0, *itertools.accumulate(counts)]
        spans = [_Rows(i, starts[i], count) for i, count in enumerate(counts)]
        targets = {}
        for name, rows in zip(names, spans):
            problem = _name_problem(name)
            if problem is not None:
                problems.append(problem)
            row, weight, bias = table.windows(rows)
            targets[f"{prefix}prompts.{name}"] = row
            targets[f"{prefix}head_weights.{name}"] = weight
            if bias is not None:
                targets[f"{prefix}head_biases.{name}"] = bias
        missing = [k for k in targets if k not in state_dict]
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        present = {k: t for k, t in targets.items() if k in state_dict}
        hint = "Load the state_dict() of a MultiTaskVAPT of this backbone and VAPT configuration."
        validate_then_copy(caller, state_dict, present, problems, hint, "state dict")
        self._clear()
        self._table = table
        self.task_rows = torch.zeros(len(table.prompts), 3, dtype=torch.long, device=self.task_rows.device)
        for name, rows in zip(names, spans):
            self._register(name, rows)
        table.prompt_end, table.class_end = len(names), starts[-1]

    # --------------------------------------------------------------------------------------------
    # forward
    # --------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "MultiTaskVAPT":
        """Dropout follows ``mode``; the frozen backbone stays in eval mode."""
        nn.Module.train(self, mode)
        self.model.train(mode)  # the VAPT model's own rule: backbone in eval, prompts and head follow
        return self

    def task_index(self, tasks: Tasks, batch: int, device: torch.device) -> torch.Tensor:
        """``tasks`` (``batch`` names, or a ``(batch,)`` integer tensor of task indices in the
        order of :attr:`tasks`) as an int64 index on ``device``, checked."""
        caller = "MultiTaskVAPT"
        if torch.compiler.is_compiling():
            # Nothing read on the host, nothing the graph would be traced again for when tasks
            # are added: the number of tasks is a device scalar.
            index = tasks.to(device=device, dtype=torch.long)
            in_range = ((index >= 0) & (index < self.num_tasks)).all()
            torch._assert_async(in_range, f"{caller}: task indices must lie in [0, len(tasks)), one per image")
            return index
        if not self._order:
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
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self._serve_traced(images, task)
        names, present, local = self._present(tasks, task)
        values = torch.stack([self.prompts[n] for n in names])  # (K, P): the batch's tasks only
        serving = None if torch.is_grad_enabled() else names
        features = self._features(images, _TaskPrompts(self.model.vapt, self._layout, values, local), serving)
        weight = torch.cat([self.head_weights[n] for n in names])  # (sum of their classes, d)
        bias = None if self._table.bias is None else torch.cat([self.head_biases[n] for n in names])
        every = F.linear(features, weight, bias)
        counts = self.task_rows[present, 2]
        starts = torch.cumsum(counts, 0) - counts
        return self._own_columns(lambda cols: torch.gather(every, 1, starts[local, None] + cols), counts[local, None])

    def _features(self, images: torch.Tensor, prompts: "_TaskPrompts", serving: Optional[list[str]] = None):
        """The pre-logits features; ``serving``: the names of the tasks, whose folds and static
        prompt projections then come from the serving cache."""
        model = self.model
        x = embed_tokens(model, images)
        for block in model.blocks:
            grid, num_prefix = block.patch_grid(x), block.num_prefix_tokens
            if serving is not None and prompts.folds_by_block is None and len(model.vapt.generators):
                prompts.folds_by_block = self._cached_folds(serving, grid)
            h, p, p_index = prompts.block(block.vapt_index, x, block.norm1, num_prefix, grid, block.backend)
            projections = None
            if serving is not None and p_index is not None:
                projections = self._cached_projections(serving, block)
            x = block.forward_prompted(x, h, p, p_index, projections)
        return model.forward_head(model.norm(x), pre_logits=True)

    def _own_columns(self, columns, counts: torch.Tensor) -> torch.Tensor:
        """``(B, max_classes)`` logits from ``columns(cols)``, the logits of each image's
        class ``min(col, C_t - 1)``, padded with ``-inf`` past each image's ``C_t`` (``counts (B, 1)``)."""
        cols = torch.arange(self._max_classes, device=counts.device)
        return columns(torch.minimum(cols, counts - 1)).masked_fill(cols >= counts, float("-inf"))

    def _serve_traced(self, images: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """The forward of a compiled or exported graph without gradients (serving): it cannot read
        the batch's tasks on the host, so each image reads its own task's rows of the table, and
        nothing in the graph depends on how many tasks are registered (it is traced again only
        when the table is rebuilt, or the widest head widens)."""
        table = self._table
        rows = self.task_rows[task]  # (B, 3): prompt row, first class row, class count
        each = torch.arange(task.shape[0], device=task.device)
        features = self._features(images, _TaskPrompts(self.model.vapt, self._layout, table.prompts[rows[:, 0]], each))

        def columns(cols):  # (B, max_classes): one product per image over its own class rows
            rows_b = rows[:, 1:2] + cols
            logits = torch.bmm(table.weight[rows_b], features.unsqueeze(-1)).squeeze(-1)
            return logits if table.bias is None else logits + table.bias[rows_b]

        return self._own_columns(columns, rows[:, 2:3])

    def _present(self, tasks: Tasks, task: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The tasks in the batch (their names and indices, sorted by index; the indices on the
        batch's device) and each image's place among them: a forward stacks and folds those
        tasks' parameters only, so its cost grows with the tasks in the batch, not the tasks
        registered, and a task absent from a training batch gets no gradient (``grad`` stays
        None, so the optimizers skip it: no weight decay, no momentum). A compiled graph that
        trains cannot read the batch's tasks on the host: it takes every task, each image its own."""
        if torch.compiler.is_compiling():
            return list(self._order), torch.arange(len(self._order), device=task.device), task
        if isinstance(tasks, torch.Tensor):
            index = torch.unique(task)  # sorted; the one host read of a forward given indices
            return [self._order[t] for t in index.tolist()], index, torch.searchsorted(index, task)
        position = self._position()
        present = sorted({position[name] for name in tasks})
        place = {t: i for i, t in enumerate(present)}
        local = torch.tensor([place[position[name]] for name in tasks], dtype=torch.long, device=task.device)
        return [self._order[t] for t in present], torch.tensor(present, dtype=torch.long, device=task.device), local

    def _served(self, names: list[str], what: object, context: tuple, compute) -> list:
        """The serving cache: the value ``what`` (a tensor, or a tuple of tensors and None) of
        each task of ``names``, computed by ``compute(stale names)`` (one value per name) for the
        tasks whose kept value is missing or stale, and kept for the tasks served last, up to
        :attr:`serving_cache_bytes` (256 MiB by default).

        A value is stamped with what it was computed from: the task's serial (each add gets a
        new one), its prompt parameter's version counter (which every in-place change of it
        bumps: an optimizer step, ``load_state_dict``, an edit under ``no_grad``) and data
        pointer, and ``context`` (the grid; the backbone block's parameters' counters and
        pointers). A stamp that differs means the value is computed again: a changed task is
        never served a stale value. A table rebuild (growth, reclaiming, ``.to()``, a copy, a
        load) empties the cache, since a freed storage's address may be handed out again. (An
        edit through ``.data`` bypasses the version counter, as it bypasses autograd: call
        :meth:`clear_cache` after one; so does converting ``mt.model`` alone, which leaves the
        tasks in the old dtype.)"""
        stamps = {}
        for name in names:
            p = self.prompts[name]
            stamps[name] = (self._serials[name], p._version, p.data_ptr(), context)
        stale = [n for n in names if (n, what) not in self._cache or self._cache[n, what][0] != stamps[n]]
        if stale:
            for name, value in zip(stale, compute(stale)):
                self._forget((name, what))
                self._cache[name, what] = (stamps[name], value)
                self._cache_bytes += _bytes(value)
        values = [self._cache[n, what][1] for n in names]
        for name in names:
            self._cache.move_to_end((name, what))
        while self._cache_bytes > self.serving_cache_bytes:
            self._forget(next(iter(self._cache)))
        return values

    def _forget(self, key: tuple[str, object]) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._cache_bytes -= _bytes(entry[1])

    def _stacked_rows(self, names: list[str]) -> "_TaskPrompts":
        return _TaskPrompts(self.model.vapt, self._layout, torch.stack([self.prompts[n] for n in names]), None)

    def _cached_folds(self, names: list[str], grid: Grid) -> torch.Tensor:
        """The folded matrices of every adaptive block of the tasks ``names``, ``(K, A, Np, N)``
        (``(K, A, Np, N, d)`` per channel), for ``grid``, from the serving cache (a task's take
        ``A x Np x N`` values, ``x d`` per channel)."""
        compute = lambda stale: [f.clone() for f in self._stacked_rows(stale).folds(grid)]  # noqa: E731
        return torch.stack(self._served(names, "folds", (grid,), compute))

    def _cached_projections(self, names: list[str], block: nn.Module) -> PromptProjections:
        """The projections of static block ``block``'s prompt rows of the tasks ``names``
        (:meth:`VAPTBlock.prompt_projections`, ``(K, ...)``), from the serving cache; they depend
        on the frozen block too, so its parameters are in the stamp."""
        attn = block.attn
        used = [*block.norm1.parameters(), *attn.qkv.parameters(), *attn.q_norm.parameters(), *attn.k_norm.parameters()]
        context = tuple((t._version, t.data_ptr()) for t in used)
        index = block.vapt_index

        def compute(stale):
            projections = block.prompt_projections(self._stacked_rows(stale).static_rows(index))
            return [PromptProjections(*(None if t is None else t[i].clone() for t in projections)) for i in range(len(stale))]

        values = self._served(names, ("projections", index), context, compute)
        return PromptProjections(*(None if v[0] is None else torch.stack(v) for v in zip(*values)))

    def clear_cache(self) -> None:
        """Forget every task's cached values (after editing a parameter through ``.data``)."""
        self._cache.clear()
        self._cache_bytes = 0


def _bytes(value) -> int:
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _name_problem(name: object) -> Optional[str]:
    """What makes ``name`` unusable as a task name, or None: it must be a non-empty printable
    string without ``.``, and not an attribute of every ``nn.ParameterDict`` (``training``,
    ``keys``, ``update``, ...), which a task of that name would shadow."""
    if not isinstance(name, str) or not name or "." in name or not name.isprintable():
        return f"a task name must be a non-empty printable string without '.', got {name!r}"
    if hasattr(_EMPTY_PARAMETER_DICT, name):
        return f"{name!r} is reserved (an attribute of nn.ParameterDict); choose another name"
    return None


_EMPTY_PARAMETER_DICT = nn.ParameterDict()


def _rebuild_after_load(module: MultiTaskVAPT, incompatible_keys) -> None:
    """``load_state_dict(..., assign=True)`` gives the tasks the loaded tensors as parameters:
    the table is rebuilt from them (after any load: a copy is cheap next to reading the values)."""
    module._rebuild_table()


def _window(rows: torch.Tensor) -> nn.Parameter:
    """A parameter whose values are ``rows`` of the table (their storage, not a copy), with a
    version counter of its own: an in-place change of one task marks that task alone as changed."""
    parameter = nn.Parameter(torch.empty(0, dtype=rows.dtype, device=rows.device))
    parameter.data = rows
    return parameter


@dataclasses.dataclass(frozen=True)
class _Rows:
    """A task's rows in the table: its row of the prompt table, and ``count`` rows of the head
    tables from ``first_class``."""

    prompt: int
    first_class: int
    count: int

    @property
    def classes(self) -> slice:
        return slice(self.first_class, self.first_class + self.count)

    def index_entry(self) -> tuple[int, int, int]:
        """The task's entry in ``MultiTaskVAPT.task_rows``."""
        return self.prompt, self.first_class, self.count


class _TaskTable:
    """Every task's values, one tensor per kind: ``prompts (rows, P)``, a row per task (its prompt
    parameters, laid out by :class:`_Layout`); ``weight (class rows, d)`` and ``bias (class rows,)``
    (None when the head has no bias), a run of ``C_t`` rows per task (its head). Rows are taken
    past the last row in use (``*_end``); rows of removed tasks stay unused (``unused_*``) until
    :meth:`MultiTaskVAPT._rebuild_table` reclaims them."""

    def __init__(self, prompts: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        self.prompts, self.weight, self.bias = prompts, weight, bias
        self.prompt_end = self.class_end = 0
        self.unused_prompts = self.unused_classes = 0

    def windows(self, rows: "_Rows") -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """A task's rows as views: its prompt row ``(P,)``, head weights ``(C_t, d)`` and biases
        ``(C_t,)`` (None without a bias)."""
        bias = None if self.bias is None else self.bias[rows.classes]
        return self.prompts[rows.prompt], self.weight[rows.classes], bias

    @classmethod
    def like(cls, old: "_TaskTable", like: torch.Tensor, prompt_rows: int, class_rows: int) -> "_TaskTable":
        """An empty table of ``old``'s widths, in ``like``'s dtype and on its device."""
        return cls.empty(old.prompts.shape[1], old.weight.shape[1], old.bias is not None, like, prompt_rows, class_rows)

    @classmethod
    def empty(cls, width: int, dim: int, bias: bool, like: torch.Tensor, prompt_rows: int = 4, class_rows: int = 4):
        """At least 4 rows each, of ``like``'s dtype and device, uninitialised (only the rows of
        tasks are ever read)."""
        empty = lambda *shape: torch.empty(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
        rows = max(4, class_rows)
        return cls(empty(max(4, prompt_rows), width), empty(rows, dim), empty(rows) if bias else None)


class _Layout:
    """Where each prompt parameter of a task lies in its row of the prompt table: the parameters
    of the model's ``VAPTPrompts`` in their order, each a slice of the row."""

    def __init__(self, template: VAPTPrompts) -> None:
        self.slots: dict[str, tuple[int, torch.Size]] = {}
        offset = 0
        for key, p in template.named_parameters():
            self.slots[key] = (offset, p.shape)
            offset += p.numel()
        self.width = offset

    def view(self, rows: torch.Tensor, key: str) -> Optional[torch.Tensor]:
        """Parameter ``key`` of rows ``(..., P)``, ``(..., *shape)``; None where the prompts have none."""
        if key not in self.slots:
            return None
        start, shape = self.slots[key]
        return rows[..., start : start + shape.numel()].view(*rows.shape[:-1], *shape)

    def views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: self.view(row, key) for key in self.slots}


class _TaskPrompts:
    """The prompts of every block for a batch whose image ``b`` belongs to task ``task[b]``, from
    the prompt rows ``values (K, P)`` of those tasks (one configuration, the template's): the
    mixed-batch twin of :meth:`VAPTPrompts.forward`."""

    def __init__(self, template: VAPTPrompts, layout: _Layout, values: torch.Tensor, task: Optional[torch.Tensor]):
        self.template, self.layout, self.values, self.task = template, layout, values, task
        self.config = template.config
        # The folded matrices of every adaptive block, (K, A, ...), when the serving cache gave
        # them (None: folded block by block); a projector's weights gathered per image, once.
        self.folds_by_block: Optional[torch.Tensor] = None
        self.projector_weights: dict[int, tuple] = {}

    def kind(self, key: str) -> Optional[torch.Tensor]:
        """Parameter ``key`` of the ``K`` tasks, ``(K, *shape)``; None where the prompts have none."""
        return self.layout.view(self.values, key)

    def fold(self, j: int, grid: Grid) -> torch.Tensor:
        """Adaptive block ``j``'s folded matrices, ``(K, Np, N)`` (``(K, Np, N, d)`` per channel)."""
        if self.folds_by_block is not None:
            return self.folds_by_block[:, j]
        g = f"generators.{j}."
        return fold_mix(self.kind(g + "token_proj.weight"), self.kind(g + "kernel"), self.config,
                        self.template.generators[j].grid, grid)  # fmt: skip

    def folds(self, grid: Grid) -> torch.Tensor:
        """Every adaptive block's folded matrices, ``(K, A, ...)``."""
        return torch.stack([self.fold(j, grid) for j in range(len(self.template.generators))], 1)

    def static_rows(self, index: int) -> torch.Tensor:
        """Static block ``index``'s prompt rows of the ``K`` tasks, ``(K, Np, d)``."""
        return self.kind("prompt")[:, 0] if index == 0 else self.kind("deep_prompts")[:, index - 1]

    def block(
        self, index: int, x: torch.Tensor, norm1: nn.LayerNorm, num_prefix: int, grid: Grid, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Block ``index``'s ``h = norm1(x)``, prompt rows and the index of each image's row:
        ``(B, Np, d)`` with index None, or the static prompts ``(K, Np, d)`` with index ``task``."""
        if self.template.is_static(index):
            rows = self.static_rows(index)
            if self.template.training and self.config.prompt_dropout > 0.0:
                return norm1(x), F.dropout(rows[self.task], self.config.prompt_dropout, True), None
            return norm1(x), rows, self.task
        j = index - self.config.vpt_depth
        gen, g = self.template.generators[j], f"generators.{j}."
        h, prompt = ops.norm_and_project(
            x, norm1.weight, norm1.bias, norm1.eps, self.kind(g + "norm.weight"), self.kind(g + "norm.bias"),
            gen.norm.eps, self.fold(j, grid), num_prefix, backend=backend, task=self.task,
        )  # fmt: skip
        mask = gen.channel_mask(x.shape[0], prompt)  # the tasks share the dropout rate: the template draws it
        if mask is not None:
            prompt = prompt * mask
        prompt = prompt + self.kind(g + "token_proj.bias")[self.task].unsqueeze(-1)
        return h, self.project(index, prompt), None

    def project(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Each image's task's feature projector on ``G (B, Np, d)``, as batched products over the
        weights gathered per image."""
        if not len(self.template.projectors):
            return g
        j = 0 if self.config.share_projector else index - self.config.vpt_depth
        template = self.template.projectors[j]
        if j not in self.projector_weights:
            p, scale = f"projectors.{j}.", self.kind(f"projectors.{j}.scale")
            self.projector_weights[j] = (
                self.kind(p + "fc1.weight")[self.task].transpose(1, 2),  # (B, d, r)
                self.kind(p + "fc2.weight")[self.task].transpose(1, 2),  # (B, r, d)
                None if scale is None else scale[self.task].unsqueeze(-1),
            )
        fc1_t, fc2_t, scale = self.projector_weights[j]
        return project_features(
            g, lambda t: torch.bmm(t, fc1_t), lambda t: torch.bmm(t, fc2_t), scale, template.activation,
            template.dropout, template.training,
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
