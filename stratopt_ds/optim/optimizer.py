"""The layer-adaptive Adam engine behind every optimizer name (spec sections 1-7).

One class computes AdamW, AdEMAMix, StratOpt, its ablations and the 12 layer-adaptive
variants; a name is only a preset of keywords (``stratopt_ds.optim.config``). Per step:

1. per-layer sums of squares of the local gradient fragments (``layer_map``), reduced across
   ranks by the map's ``reduce`` (identity on one process);
2. per-layer clip coefficients and scales ``alpha_l`` (``layer_stats``);
3. the elementwise update of every fragment with its layer's scalars.

The elementwise update is::

    g  = clip_coef_l * grad
    m1 = b1*m1 + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  m2 = b3(t)*m2 + (1-b3(t))*g  (if mix_alpha > 0)
    u  = (m1/(1-b1^t) + a(t)*m2) / (sqrt(v/(1-b2^t)) + eps)
    theta = theta*(1 - lr*wd) - lr*alpha_l*u

which is AdamW's decoupled decay for every optimizer (spec sections 1, 2 and 4 agree on it).

Choices where the spec leaves room:

* ``beta1_mode="depth"`` replaces ``betas[0]`` by ``b1_l`` in the first moment, in its bias
  correction, and as the start point of the ``b3(t)`` warm-up.
* The whole step is computed without a host synchronisation: a non-finite layer norm turns the
  learning rate and the moment weights to zero through a device flag, so weights, moments and
  the step counter stay bit-identical, and ``skipped_steps`` counts it.
* Group values are checked when a group is added (an unknown key such as ``wieght_decay`` is
  refused, naming the allowed keys) and again at every ``step()``, on the host: ``lr = nan``
  written into a group after construction is refused with ValueError before anything changes.
  A tensor ``lr`` is checked on its device instead (no sync): a bad value skips that group's
  step, like a non-finite gradient, and counts in ``skipped_steps``.
* Parameters whose ``.grad`` is None are neither measured nor updated, like ``torch.optim``.
* States are float32 and contiguous whatever the parameter dtype and layout; a low-precision or
  non-contiguous parameter (channels_last, transposed, a slice) is updated through a contiguous
  float32 copy and written back (rounded), exactly as its contiguous float32 copy would step.
* Complex parameters and sparse gradients are refused (``torch.optim.AdamW`` steps complex
  ones as pairs of reals; the fused update has no complex path).
* The layer statistics ride inside every ``param_groups`` entry of ``state_dict()`` (and, for
  older readers, under a top-level ``"layer_stats"`` key): torch.distributed.checkpoint keeps
  group entries but drops extra top-level keys.
* ``copy.deepcopy`` / pickling keep the layer statistics; a copy is never bound to a DeepSpeed
  ZeRO wrapper (it re-attaches in ``step()`` when a wrapper drives it).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import torch
from torch.optim import Optimizer

from .. import ops
from ..ops.dispatch import HALF_DTYPES  # written by the fused update itself
from ..layer_map import Fragment, LayerMap, layer_layout, whole_tensor_map
from ..sharding import LocalSharding
from . import config
from .layer_stats import LayerStats, LayerStep

LAYER_STATS = "layer_stats"  # where state_dict() keeps the layer statistics


def _refuse_complex(t: torch.Tensor, index: int, what: str = "parameter") -> None:
    # The fused update is real-valued: it would silently zero the imaginary part.
    if t.is_complex():
        raise ValueError(f"{what} {index} (shape {tuple(t.shape)}, {t.dtype}) is complex: complex "
                         "parameters are not supported by stratopt_ds optimizers; optimize the "
                         "real view (torch.view_as_real) as a real parameter instead")


def _check_param_names(group: dict[str, Any], index: int) -> None:
    # Names pair with tensors by position: one too few would shift every later layer's name.
    if "param_names" not in group:
        return
    names, n = group["param_names"], len(group["params"])
    if not isinstance(names, (list, tuple)) or not all(isinstance(x, str) for x in names):
        raise ValueError(f"parameter group {index}: 'param_names' must be a list of strings, one "
                         f"per parameter, got {type(names).__name__}")
    if len(names) != n:
        raise ValueError(f"parameter group {index}: 'param_names' has {len(names)} names for "
                         f"{n} parameters; give one name per parameter, in order")


def _steps_in_place(p: torch.Tensor) -> bool:
    return p.dtype == torch.float32 and p.is_contiguous()


class LayerwiseAdam(Optimizer):
    """Layer-adaptive Adam; see the module docstring. Keywords: spec section 10.

    ``capturable=True`` (as in ``torch.optim.Adam``): make the step safe to capture in a CUDA
    graph for bfloat16/float16 (or float64, or non-contiguous) parameters too, by stepping them
    through float32 work buffers that live as long as the optimizer (4 bytes per element of such
    a parameter, also during forward and backward) instead of a float32 copy per step, whose
    new address each step would need a new kernel table inside the capture. Contiguous float32
    parameters are capturable either way. Not a hyperparameter: it changes no result, only where
    the float32 values live.
    """

    preset: ClassVar[str] = "adamw"

    def __init__(self, params: Iterable[Any], *, capturable: bool = False, **hyperparams: Any):
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable={capturable!r}: expected True or False")
        self.capturable = capturable
        # the same resolution the run policy checks requests with (no optimizer built there)
        defaults, self.layer_options = config.resolve_keywords(self.preset, hyperparams)
        self.base_layer_map: Optional[LayerMap] = None  # whole tensors, as built
        # where a step's per-layer sums of squares come from (stratopt_ds.sharding): local, or
        # a ZeroBinding under DeepSpeed ZeRO
        self.sharding: Any = None
        self.layer_stats: Optional[LayerStats] = None
        self.last_step: Optional[LayerStep] = None
        super().__init__(params, defaults)
        self._build_layer_map()

    # ----------------------------------------------------------------------------------------
    # Groups, names and the layer map

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in config.LAYER_DEFAULTS:
            if isinstance(param_group, dict) and key in param_group:
                raise ValueError(f"{key!r} is an optimizer-wide setting and cannot be set per "
                                 f"parameter group; pass {key}=... to the optimizer instead")
        index = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        try:
            config.check_group_keys(group, index)
            _check_param_names(group, index)
            config.validate_group(group)
            first = sum(len(g["params"]) for g in self.param_groups[:-1])
            for k, p in enumerate(group["params"]):
                if p.is_sparse:
                    raise ValueError("sparse parameters are not supported")
                _refuse_complex(p, first + k)
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        if self.base_layer_map is not None:  # a group added after construction
            if not self.sharding.is_local:
                raise ValueError("cannot add a parameter group to an optimizer driven by DeepSpeed ZeRO")
            self._build_layer_map()

    def _param_names(self) -> list[str]:
        names: list[str] = []
        for g, group in enumerate(self.param_groups):
            if "param_names" in group:
                names.extend(group["param_names"])
            elif self.layer_options["granularity"] == "block":
                raise ValueError("granularity='block' needs parameter names: build the optimizer "
                                 "with stratopt_ds.create_optimizer(model, ...), pass "
                                 "model.named_parameters(), or give each group 'param_names'")
            else:
                names.extend(f"group{g}.param{k}" for k in range(len(group["params"])))
        return names

    def _build_layer_map(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        names = self._param_names()
        layer_map = whole_tensor_map(params, names, self.layer_options["granularity"])
        self.param_name = {id(p): n for p, n in zip(params, names)}  # for sharded checkpoints
        device = params[0].device if params else torch.device("cpu")
        self.base_layer_map = layer_map
        self.sharding = LocalSharding(layer_map)
        self._init_layer_stats(device)

    @property
    def layer_map(self) -> LayerMap:
        """The map of the tensors ``step()`` updates: the sharding strategy's."""
        return self.sharding.layer_map

    def bind_sharding(self, binding) -> None:
        """Step flat partitions through ``binding`` (a :class:`stratopt_ds.zero.ZeroBinding`).

        The layer numbering is the optimizer's own, so the statistics carry over unchanged."""
        assert binding.layer_map.num_layers == self.layer_stats.num_layers
        self.sharding = binding

    def number_layers_globally(self, model_names: Sequence[str]) -> None:
        """Number the layers over ``model_names``, the parameter names of the whole model, of
        which this optimizer holds a part (a pipeline stage), so that layer ids, depths and the
        length of the norm vector are the same on every rank. Before the first step only."""
        if int(self.layer_stats.count.sum()) or int(self.layer_stats.skipped_steps):
            raise ValueError("number_layers_globally() after the first step would renumber the "
                             "layer statistics; call it before training")
        mine = self.param_name
        missing = sorted(set(mine.values()) - set(model_names))
        if missing:
            raise ValueError(f"the model's parameter names lack this optimizer's {missing[:5]}")
        layout = layer_layout(list(model_names), self.layer_options["granularity"])
        # (DeepSpeed may already have swapped the groups' tensors for its partitions: the map
        # is keyed by the tensors the optimizer was built with)
        old = self.base_layer_map
        index = {key: i for i, key in enumerate(layout.layer_names)}
        frags = {tensor: [Fragment(f.start, f.length, index[old.layout.layer_names[f.layer]]) for f in fs]
                 for tensor, fs in old.fragments.items()}
        self.base_layer_map = LayerMap(layout, frags)
        self.sharding = LocalSharding(self.base_layer_map)
        device = self.layer_stats.gbar.device
        self.layer_stats = None
        self._init_layer_stats(device)

    def _init_layer_stats(self, device: torch.device) -> None:
        """(Re)create the layer statistics; they carry over when the numbering only grows."""
        layer_map = self.layer_map
        old = self.layer_stats
        stats = LayerStats(layer_map.num_layers, self.layer_options, device)
        if old is not None and old.num_layers <= stats.num_layers:
            for key in ("gbar", "count", "clip_count"):
                getattr(stats, key)[: old.num_layers].copy_(getattr(old, key))
            stats.skipped_steps.copy_(old.skipped_steps)
        self.layer_stats = stats
        depths = torch.tensor(layer_map.layout.depths, dtype=torch.float64, device=device)
        self._depth_beta1 = config.DEPTH_B1_BASE + config.DEPTH_B1_SPAN * depths

    # ----------------------------------------------------------------------------------------
    # Readable counters

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped because a layer norm was NaN or Inf."""
        return int(self.layer_stats.skipped_steps)

    def layer_clip_counts(self) -> dict[str, int]:
        """How often each layer's gradient was clipped, by layer name."""
        counts = self.layer_stats.clip_count.tolist()
        return dict(zip(self.layer_map.layout.layer_names, counts))

    # ----------------------------------------------------------------------------------------
    # The step

    def _stepped_tensors(self):
        params = ((group, p) for group in self.param_groups for p in group["params"])
        for index, (group, p) in enumerate(params):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError("sparse gradients are not supported")
                # p itself was checked when added, but .data may have been swapped since
                _refuse_complex(p.grad, index, "the gradient of parameter")
                _refuse_complex(p, index)
                yield group, p

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_group_values()
        stepped = list(self._stepped_tensors())
        ids = {id(p) for _, p in stepped}
        if self.sharding.is_local and any(i not in self.layer_map.fragments for i in ids):
            from ..zero import attach  # DeepSpeed replaced our tensors by flat partitions, unbound
            attach(self)
        # Under ZeRO the inner step runs once per group; the norms of all groups are taken
        # (with one all-reduce) at the first call of each engine step and reused by the rest.
        if self.sharding.starts_step(ids):
            layer_sq = self.sharding.layer_sq(((p, p.grad) for _, p in stepped), self.layer_stats.gbar.device)
            self.last_step = self.layer_stats.advance(layer_sq)
        self._update(stepped, self.last_step)
        return loss

    def _check_group_values(self) -> None:
        """Group values change after construction (schedulers, users, a loaded state dict): a
        bad one (lr = nan) is refused before anything is touched. Host values only, no device
        sync; a tensor lr is checked on its device in ``_update``."""
        for index, group in enumerate(self.param_groups):
            try:
                config.validate_group(group, read_tensors=False)
            except ValueError as e:
                raise ValueError(f"param_groups[{index}]: {e}; refused at step(): the weights and "
                                 f"the optimizer state are unchanged") from None

    def init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The state of ``p``, created (zeros, step 0) if it has none yet."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
            zeros = lambda: torch.zeros(p.shape, dtype=torch.float32, device=p.device)  # noqa: E731
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
            if group["mix_alpha"] > 0:
                state["exp_avg_slow"] = zeros()
        return state

    def _update(self, stepped, ls: LayerStep) -> None:
        # The elementwise maths lives in stratopt_ds.ops (native kernels and the PyTorch
        # reference); here only the bookkeeping: states, step counters, one call per group.
        finite = ls.finite
        keep = finite.to(torch.float64)  # 1: apply the step, 0: leave everything as it is
        bad_lr = None  # a tensor lr that is non-finite or negative, on the device
        depth_mode = self.layer_options["beta1_mode"] == "depth"
        beta1_layer = self._depth_beta1 if depth_mode else None
        groups: dict[int, tuple[dict[str, Any], list[torch.Tensor]]] = {}
        for group, p in stepped:
            groups.setdefault(id(group), (group, []))[1].append(p)
        for group, ps in groups.values():
            lr, group_finite, group_keep = group["lr"], finite, keep
            if isinstance(lr, torch.Tensor):
                # Checked where it lives, without a host sync (CUDA graphs replay it): a bad value
                # skips this group's step as a non-finite gradient does, counted in skipped_steps.
                ok = torch.isfinite(lr) & (lr >= 0)
                lr = torch.where(ok, lr, torch.zeros_like(lr))  # 0 * nan would still be nan
                ok = ok.to(finite.device)
                bad_lr = ~ok if bad_lr is None else bad_lr | ~ok
                group_finite = finite & ok
                group_keep = group_finite.to(torch.float64)
            states = [self.init_state(p, group) for p in ps]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, group_keep)
            p32s = self._fp32_views(ps)
            # a contiguous bf16/fp16 parameter is written from its fp32 copy in the same pass
            # (the kernels write flat memory); any other copy is written back below
            outs = [p if (p32 is not p and p.dtype in HALF_DTYPES and p.is_contiguous()) else None
                    for p, p32 in zip(ps, p32s)]
            mix = group["mix_alpha"] > 0
            # Tensors go as they are (contiguous, any shape: the ops address them flat); no
            # per-tensor views, so the host time of a step stays small with hundreds of tensors.
            ops.fragment_update(
                p32s, [p.grad for p in ps],
                [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                [st["exp_avg_slow"] for st in states] if mix else None, steps,
                self.layer_map.rows_of(ps), group_finite, ls.clip_coef, ls.alpha, beta1_layer,
                lr=lr, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                weight_decay=group["weight_decay"], beta3=group["beta3"],
                mix_alpha=group["mix_alpha"], t_alpha=group["t_alpha"], t_beta3=group["t_beta3"],
                half_out=outs)
            for p, p32, out in zip(ps, p32s, outs):
                if p32 is not p and out is None:  # float64, or a non-contiguous parameter
                    p.copy_(p32)
        if bad_lr is not None:  # once per step, however many groups had a bad lr
            self.layer_stats.skipped_steps.add_((finite & bad_lr.reshape(())).to(torch.int64))

    def _fp32_views(self, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter as a contiguous float32 tensor, which the fused update steps (it reads
        and writes flat memory): itself, or a copy of a bf16/fp16/fp64 or a non-contiguous one
        (channels_last, transposed, a slice), in the same logical order as its gradient and
        states, so it steps exactly like a contiguous float32 clone; the parameter is then
        written back from it (rounded). With ``capturable`` the copy is a work buffer kept from
        step to step (see the class doc): the CUDA op's tables, built by an eager step, then
        serve a captured one."""
        if not self.capturable:
            return [p if _steps_in_place(p) else
                    torch.empty(p.shape, dtype=torch.float32, device=p.device).copy_(p) for p in ps]
        work = self.__dict__.setdefault("_fp32_work", {})  # id(p) -> (weakref to p, buffer)
        out, srcs, dsts = [], [], []
        for p in ps:
            if _steps_in_place(p):
                out.append(p)
                continue
            ref, buf = work.get(id(p), (None, None))
            if ref is None or ref() is not p or buf.shape != p.shape or buf.device != p.device:
                for key in [k for k, (r, _) in work.items() if r() is None]:  # parameters gone
                    del work[key]
                buf = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                work[id(p)] = (weakref.ref(p), buf)
            srcs.append(p)
            dsts.append(buf)
            out.append(buf)
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        return out

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; the layer statistics (one snapshot) ride in every param_groups
        entry, which torch.distributed.checkpoint's get/set_optimizer_state_dict keep (they drop
        extra top-level keys; every group, as they may regroup by parameter name), and under the
        top-level ``"layer_stats"`` key that earlier versions wrote and read."""
        state = super().state_dict()
        stats = self.layer_stats.state_dict()
        state[LAYER_STATS] = stats
        for group in state["param_groups"]:  # packed copies: the live groups stay as they are
            group[LAYER_STATS] = stats
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, also one saved before the statistics moved into the groups
        (top-level ``"layer_stats"`` only) or one that went through torch.distributed.checkpoint
        (groups only)."""
        state_dict = dict(state_dict)
        top = state_dict.pop(LAYER_STATS, None)
        groups = [dict(group) for group in state_dict.get("param_groups", [])]
        in_groups = [group.pop(LAYER_STATS) for group in groups if LAYER_STATS in group]
        stats = in_groups[0] if in_groups else top
        if stats is None:
            raise ValueError(
                "state_dict has no 'layer_stats': it was not saved by a stratopt_ds optimizer, or "
                "went through torch.distributed.checkpoint with flatten_optimizer_state_dict=True, "
                "which keeps only the keys a fresh optimizer has (keys: %s)" % sorted(state_dict))
        state_dict["param_groups"] = groups  # without the statistics, which are not group settings
        super().load_state_dict(state_dict)
        self._restore_state_dtypes(state_dict)
        self.layer_stats.load_state_dict(stats)

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` casts every floating state to its parameter's dtype: a
        bf16 model's moments would come back rounded to bf16 (and the kernels refuse them), and
        a step counter stays where ``map_location`` put it, as whatever type it was saved as.
        Take each state again from the saved one, exact: moments float32 (and contiguous, as the
        kernels address them flat), step counters float64 0-dim tensors (torch's optimizers
        accept a Python number or an integer tensor there, so do we), on the parameter's device."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, (saved_id, p) in enumerate(zip(saved_ids, params)):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key == "step":
                    value = torch.as_tensor(value)
                    if value.numel() != 1:
                        raise ValueError(f"state of parameter {index}: 'step' has {value.numel()} "
                                         "elements, expected one number")
                    self.state[p][key] = value.to(p.device, torch.float64, copy=True).reshape(())
                elif torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True,
                                                  memory_format=torch.contiguous_format)

    # ----------------------------------------------------------------------------------------
    # Copies (copy.deepcopy, pickle, torch.save of the optimizer object)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the layer statistics and settings
        # must travel too. The layer map is keyed by tensor identity, so the copy rebuilds it for
        # its own (copied) parameters. A DeepSpeed ZeRO binding is not copied: under ZeRO the
        # groups hold DeepSpeed's flat partitions, so the map of the model's own parameters (by
        # identity, valid in this process) is kept as it is, and the copy re-attaches in step()
        # to whichever wrapper drives it.
        state = super().__getstate__()
        state.update(capturable=self.capturable, layer_options=self.layer_options,
                     layer_stats=self.layer_stats, last_step=self.last_step)
        params = [p for group in self.param_groups for p in group["params"]]
        if not all(id(p) in self.base_layer_map.fragments for p in params):  # ZeRO's partitions
            state.update(base_layer_map=self.base_layer_map, param_name=self.param_name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "layer_options" not in state:  # torch's load_state_dict sets state and groups this way
            return
        if "base_layer_map" in state:
            self.sharding = LocalSharding(self.base_layer_map)
            self._init_layer_stats(self.layer_stats.gbar.device)  # carries the statistics over
        else:
            self.base_layer_map = None
            self._build_layer_map()  # carries the statistics over
