"""The quantities of one configuration that every cost term reads (:class:`Step`), made once per evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from meshplan.planner import comm, memory
from meshplan.planner.block import (ExpertLayout, LayerCost, block_activation_bytes, config_layer_cost,
                                    data_context_stride)
from meshplan.planner.comm import GroupLink
from meshplan.planner.host import HostModel
from meshplan.planner.inputs import Config, Context
from meshplan.planner.vocab import VocabCost, vocab_cost


@dataclass(frozen=True)
class Step:
    """One configuration's step: its block and vocabulary costs, training-state bytes, micro-batches, and the
    groups its data-parallel and pipeline traffic runs over.

    The runtime shards and reduces over dp and cp together (launcher/runtime/parallelize.py: Meshes.dp_cp):
    context ranks hold the same weights and their gradients are summed like data-parallel ones, so the
    data-parallel group is ``replicas = dp * cp`` ranks, its stride the smaller of the two. A pipeline hop
    moves the [s/cp, b, h] activation (split by tp under sequence parallel): ``boundary_bytes``, ``hop``
    seconds (comm.p2p_time). The vocabulary shard (vocab_parallel) is outside FSDP2 (vocab_parallel.py): its
    fp32 weights, plain AdamW state and fp32 gradient buffers are whole on every data rank
    (``shard_states``)."""

    ctx: Context
    cfg: Config
    lc: LayerCost
    vc: VocabCost
    sb: memory.StateBytes
    num_mb: int
    replicas: int
    dp_stride: int
    dp_link: GroupLink
    pp_link: GroupLink
    boundary_bytes: float
    hop: float
    in_flight: tuple[float, ...]          # micro-batches in flight per pipeline rank (memory.microbatches_in_flight)
    vocab_shard_params: float
    shard_states: dict[str, float]
    expert_dp: int = 1                    # ranks holding the same experts (Config.expert_dp)
    expert_dp_link: GroupLink | None = None   # their group's link (None without experts)
    # block costs by share of MoE blocks (for_blocks), shared by the steps derived from this one
    block_costs: dict[float, LayerCost] = field(default_factory=dict, compare=False, repr=False)
    # this step's for_blocks results by share (its own: replace() starts the copy with an empty one)
    for_share: dict[float, "Step"] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def p(self) -> int:
        return self.cfg.pp

    @property
    def v(self) -> int:
        return self.cfg.virtual_stages

    @property
    def n_stages(self) -> int:
        return self.cfg.pp * self.cfg.virtual_stages

    @property
    def host(self) -> HostModel:
        return self.ctx.host

    @property
    def mixes_blocks(self) -> bool:
        """Whether the model has both dense and MoE blocks (DeepSeek's first dense blocks, an MoE every
        ``n``-th block), so that a rank's blocks cost their own mix rather than the mean block ``lc``."""
        model = self.ctx.model
        return model.moe is not None and 0 < model.moe_layer_count < model.layers

    def for_blocks(self, layers: list[int]) -> "Step":
        """This step with ``lc`` the mean of blocks ``layers`` (a rank's or a stage's own mix of dense and MoE
        blocks); itself where every block is alike."""
        if not self.mixes_blocks or not layers:
            return self
        share = len(self.ctx.model.moe_layer_ids.intersection(layers)) / len(layers)
        step = self.for_share.get(share)
        if step is None:
            cost = self.block_costs.get(share)
            if cost is None:
                cost = self.block_costs[share] = engine_layer_cost(self.ctx, self.cfg, share)
            step = self.for_share[share] = self if cost is self.lc else replace(self, lc=cost)
        return step


def step_of(ctx: Context, cfg: Config) -> Step:
    """The :class:`Step` of ``cfg`` under ``ctx``."""
    model, train, cluster = ctx.model, ctx.train, ctx.cluster
    p, v = cfg.pp, cfg.virtual_stages
    num_mb = ctx.num_microbatches(cfg)
    vc = vocab_cost(ctx, cfg)
    sb = memory.engine_state_bytes(ctx.engine.state_layout, train.precision, train.optimizer)
    degrees = cfg.degrees
    replicas = cfg.dp * cfg.cp
    dp_stride = min(comm.group_stride(cfg.mesh_order, degrees, "dp"), comm.group_stride(cfg.mesh_order, degrees, "cp"))
    dp_link = comm.group_link(cluster, replicas, dp_stride)
    pp_link = comm.group_link(cluster, cfg.pp, comm.group_stride(cfg.mesh_order, degrees, "pp"))
    boundary_bytes = cfg.micro_batch * train.seq_len / cfg.cp * model.hidden / (cfg.tp if cfg.sp else 1) * ctx.act_bytes
    hop = comm.p2p_time(boundary_bytes, pp_link) if p > 1 else 0.0
    in_flight = tuple(memory.microbatches_in_flight(cfg.schedule, p, r, num_mb, v) for r in range(p))
    vocab_shard_params = vc.each_params if cfg.vocab_parallel else 0.0
    shard_states = memory.model_state_bytes(vocab_shard_params, 0, 1, sb)
    expert_link = expert_dp_link(ctx, cfg) if model.moe is not None else None
    lc = engine_layer_cost(ctx, cfg)
    mean_share = model.moe_layer_count / model.layers
    return Step(ctx, cfg, lc, vc, sb, num_mb, replicas, dp_stride, dp_link, pp_link, boundary_bytes, hop, in_flight,
                vocab_shard_params, shard_states, cfg.expert_dp, expert_link, block_costs={mean_share: lc})


def expert_dp_link(ctx: Context, cfg: Config) -> GroupLink:
    """The link of the expert-data-parallel group (the ranks holding the same experts): where the experts are
    whole on every TP rank its nearest members are TP neighbours (the tensor dimension's stride); else its
    members are every ``ep``-th member of the data x context group."""
    degrees = cfg.degrees
    if cfg.tp // cfg.expert_tp > 1:     # experts replicated over tp: tp ranks belong to the group
        return comm.group_link(ctx.cluster, cfg.expert_dp, comm.group_stride(cfg.mesh_order, degrees, "tp"))
    return comm.group_link(ctx.cluster, cfg.expert_dp, data_context_stride(cfg.mesh_order, degrees) * cfg.ep)


def engine_layer_cost(ctx: Context, cfg: Config, moe_share: float | None = None) -> LayerCost:
    """The block's costs (block.config_layer_cost; ``moe_share``: of blocks of which that share are MoE blocks)
    with the saved activations of the engine that runs it: its sequence-parallel saved input and its selective
    policy (block.block_activation_bytes)."""
    lc = config_layer_cost(ctx, cfg, moe_share)
    engine = ctx.engine
    if engine.sp_saved_input == "gathered" and engine.selective_recompute == "meshplan":
        return lc
    acts = {mode: block_activation_bytes(ctx.model, ctx.train.seq_len, cfg.micro_batch, cfg.tp, cfg.cp,
                                         ctx.act_bytes, cfg.fused_kernels, mode, engine.sp_saved_input,
                                         engine.selective_recompute, cfg.sp, cfg.attention == "flash",
                                         ExpertLayout(cfg.ep, cfg.expert_tp, cfg.moe_imbalance), lc.imbalance,
                                         moe_share)
            for mode in lc.act}
    return replace(lc, act=acts, act_full_layer=acts["none"])
