"""
Routers: the function that decides which experts see which token. Everything about
routing lives in this file: the settings (RouterConfig), the routers, their losses.

Every router is a small nn.Module built from the config. Its forward takes the hidden
states of the N tokens of a batch, h [N, d], and returns a Routing: a flat list of P
(token, expert, weight) assignment pairs, the router's own losses (already multiplied by
their coefficients) and its raw scores for the metrics.

Flat pairs let token choice (P = N*k), capacity dropping (pairs marked dropped, with
weight 0), expert choice (P = E*C) and routers with a variable number of experts per
token share one MoE layer.

The loss functions are pure functions of tensors so you can check them by hand.
Adding a router = one class + one line in ROUTERS + one test in test_routers.py; a new
setting is one more field of RouterConfig.
"""

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# What a router returns


@dataclass
class Routing:
    token_idx: torch.Tensor   # [P] long: which token each assignment belongs to
    expert_idx: torch.Tensor  # [P] long: which expert it goes to
    weight: torch.Tensor      # [P] float: gate weight multiplying that expert's output (0 if dropped)
    logits: torch.Tensor      # [N, E] fp32 raw router scores, detached, for metrics
    losses: dict = field(default_factory=dict)  # name -> scalar, already scaled by its coefficient
    gate_weight: Optional[torch.Tensor] = None  # [E, d] the gate W_g, detached (GatePro's metrics); None = no gate
    kept: Optional[torch.Tensor] = None  # [P] bool: False for a pair dropped by capacity (or an empty slot);
                                         # None = none can be
    expert_out: Optional[torch.Tensor] = None  # [P, d] raw output of each pair's expert, detached: the MoE
                                               # layer adds it to a copy of the Routing when asked (metrics)
    used: Optional[torch.Tensor] = None  # [P] bool: False for an empty slot (below); None = every slot is used
    cap_bound: Optional[torch.Tensor] = None  # [N] bool: tokens that wanted more experts than the router's
                                              # cap max_k allows; None = the router has no such cap
    active_gates: Optional[torch.Tensor] = None  # [E] long: tokens whose gate for each expert is > 0, whether
                                                 # the cap let the expert run or not (ReMoE's sparsity); None = n/a
    # A dropped pair stays in the tensors, with weight 0 and kept False: P is what the router
    # asked for, whatever the capacity drops, so no shape depends on the routing (selecting
    # the kept pairs would read their number back from the GPU, and recompile under
    # torch.compile whenever it changed). The MoE layer runs no expert for it.
    # Routers that give a token as many experts as it needs (topp, remoe, null experts) keep
    # the same fixed shapes: every token gets a fixed number of slots (max_k, or top_k), and
    # a slot the router leaves empty (past top-p's cut, a ReLU gate <= 0, a null expert's)
    # has used False, kept False and weight 0. No expert runs for it, and no metric counts it:
    # it is neither an expert's load nor an assignment dropped by capacity.

    def __post_init__(self):
        if self.used is not None and self.kept is None:
            self.kept = self.used  # an empty slot is never kept

    @property
    def n_slots(self):
        """Pairs in the tensors: P."""
        return self.token_idx.numel()

    @property
    def n_requested(self):
        """Assignments the router asked for, before capacity dropping: P, or a 0-d tensor
        when some slots may be empty (used)."""
        return self.n_slots if self.used is None else self.used.sum()

    @property
    def n_pairs(self):
        """Assignments kept: P, or a 0-d tensor when capacity may have dropped some (on the
        device: read it back together with the other numbers, not alone)."""
        return self.n_requested if self.kept is None else self.kept.sum()

    def load(self):
        """[E] long: kept assignments per expert."""
        return expert_counts(self.expert_idx, self.logits.size(-1), self.kept)

    def experts_per_token(self, n_tokens):
        """[n_tokens] long: how many experts ran for each token (its kept pairs)."""
        return expert_counts(self.token_idx, n_tokens, self.kept)

    def top_expert(self, n_tokens):
        """[n_tokens] long: the expert with the largest gate weight for each token, -1
        for a token that got no expert (dropped, or unpicked under expert choice). Ties go
        to the pair listed last."""
        weight = self.weight.detach().float()
        if self.kept is not None:
            weight = weight.masked_fill(~self.kept, -float('inf'))
        best_weight = torch.full((n_tokens,), -float('inf'), device=weight.device)
        best_weight.scatter_reduce_(0, self.token_idx, weight, reduce='amax')
        is_best = (weight == best_weight[self.token_idx]) & (weight > -float('inf'))
        pair = torch.arange(weight.numel(), device=weight.device)
        best_pair = torch.full((n_tokens,), -1, dtype=torch.long, device=weight.device)
        best_pair.scatter_reduce_(0, self.token_idx, torch.where(is_best, pair, -1), reduce='amax')
        return torch.where(best_pair >= 0, self.expert_idx[best_pair.clamp(min=0)], -1)


# -----------------------------------------------------------------------------
# Every routing setting


# where the Switch balance loss takes its counts (RouterConfig.balance_scope), for messages
BALANCE_SCOPES = {'batch': 'over each micro-batch', 'sequence': 'per sequence', 'global': 'over the global batch'}


@dataclass
class RouterConfig:
    """The routing settings, each with its default and its source. GPTConfig (model.py)
    inherits these fields, so every one is a flat config key: --router=gatepro
    --gatepro_penalty=1e-4. None means "the router's own default": each router class
    lists its paper's values in `defaults`, and in `fixed` the values it cannot work
    without (switch and hash are top-1). A value given that contradicts a fixed one is an
    error, never silently replaced."""
    router: str = 'topk'  # a name in ROUTERS
    n_exp: int = 8  # experts per MoE layer; 0 or 1 = a dense MLP everywhere, no router
    top_k: Optional[int] = None  # experts per token (token choice); None = the router's default
    # capacity (Switch sec. 2.2): None = dropless (or the router's default, switch: 1.25)
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None  # None = the router's default, else capacity_factor
    renormalize: Optional[bool] = None  # top-k weights divided by their sum (Mixtral) or not (OLMoE)
    # losses by coefficient, None = the router's default (see each class and the README's table)
    aux_loss_coef: Optional[float] = None  # Switch balance loss, Fedus et al. 2021 sec. 2.2
    # the tokens the balance loss counts (Router.standard_losses): 'batch' = each micro-batch;
    # 'sequence' = each sequence, averaged (DeepSeekMoE's sequence-wise loss, which Guo et al.'s
    # released configs train with); 'global' = f over the global batch, all micro-steps and DDP
    # ranks (Qiu et al. 2025, arXiv 2501.11873, Qwen3's MoE), P over the micro-batch
    balance_scope: str = 'batch'
    aux_loss_per_sequence: bool = False  # True = balance_scope='sequence', its older name (old configs)
    z_loss_coef: Optional[float] = None  # router z-loss, Zoph et al. 2022 (ST-MoE) sec. 3.1
    var_loss_coef: Optional[float] = None  # gamma of Guo et al. 2025: variance of each token's routing softmax
    ortho_loss_coef: Optional[float] = None  # beta of Guo et al. 2025: orthogonality of the selected experts' outputs
    ortho_loss_eps: float = 1e-6  # epsilon in L_o's projection denominator
    # ...or set at the first training step so that |term| starts at the target (Router.scaled_loss);
    # None = off, the fixed coefficient above. A target and its coefficient together are an error
    var_loss_target: Optional[float] = None  # the authors' released configs: 1e-3
    ortho_loss_target: Optional[float] = None  # the authors' released configs: 1e-4
    # GatePro (Zheng et al. 2025, arXiv 2510.13079)
    gatepro_penalty: float = 1e4  # lambda subtracted from a losing expert's logit; 1e-4 is the paper's literal value
    gatepro_start_iter: int = 0  # competition on from this iteration...
    gatepro_end_iter: Optional[int] = None  # ...until this one (excluded); None = to the end
    gatepro_penalty_on: str = 'logits'  # lambda on W_g h (Algorithm 1 as read here), or 'probs': on softmax(W_g h)
    # Switch (Fedus et al. 2021)
    switch_jitter: float = 0.01  # multiplicative router-input noise U[1-eps, 1+eps], training only; 0 = off
    # DeepSeek-V3 auxiliary-loss-free balancing (arXiv 2412.19437 sec. 2.1.2)
    aux_free_update_rate: float = 0.001  # gamma: bias step per optimizer step (DeepSeek-V3 sec. 4.2)
    aux_free_seq_loss_coef: float = 1e-4  # alpha of the sequence-wise balance loss (sec. 4.2); 0 = off
    aux_free_scale: float = 1.0  # gate weights multiplier (DeepSeek-V3's released config: 2.5)
    # hash layers (Roller et al. 2021)
    hash_seed: int = 0  # seed of the fixed random token-id -> expert map
    # routers that give a token as many experts as it needs (topp, remoe): every token gets
    # max_k slots, whatever it uses (fixed shapes: memory and GPU compute O(N * max_k * d))
    max_k: Optional[int] = None  # the most experts one token may take; None = min(n_exp, 2 * top_k), this
                                 # project's cap (the papers have none: --max_k=n_exp)
    # dynamic top-p routing (Huang et al. 2024, arXiv 2403.07652)
    top_p: float = 0.4  # p: the fewest experts whose probabilities sum to >= p (the authors' released config)
    dynamic_loss_coef: Optional[float] = None  # beta of the dynamic loss (routing entropy); None = the router's
                                               # default (topp: 1e-4, not read from the paper: TopPRouter)
    # ReMoE (Wang et al. 2025, arXiv 2412.14711): lambda_{i+1} = lambda_i * alpha^sign(target - sparsity)
    remoe_l1_init: float = 1e-8  # lambda_0 of the L1 penalty on the ReLU gates (a copy of the authors' code)
    remoe_l1_multiplier: float = 1.2  # alpha (the same copy; neither read from the paper: ReMoERouter)
    remoe_balanced_l1: bool = True  # the load-balanced L1 (the paper's default), False = plain L1
    # null experts for the top-k softmax routers (MoE++'s zero experts, arXiv 2410.07348):
    # the router scores n_exp + n_null_exp experts; a slot given to a null one runs nothing
    n_null_exp: int = 0
    null_balance_weight: float = 0.75  # tau: a null expert's weight in MoE++'s balance loss (1 = a real expert's);
                                       # not read from the paper (TopKRouter's docstring)

    def __post_init__(self):
        # every problem here is a user's setting: say which, and what would work
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; available: {', '.join(sorted(ROUTERS))}")
        if self.gatepro_penalty_on not in ('logits', 'probs'):
            raise ValueError(f"gatepro_penalty_on={self.gatepro_penalty_on!r} must be 'logits' or 'probs'")
        scope_given = self.read_balance_scope()
        self.check_variable_k_settings()
        if self.n_exp <= 1:
            return  # a dense model: no router is built
        router_class = ROUTERS[self.router]
        targeted = self.check_loss_targets(router_class)  # before the defaults: a default coefficient is not "given"
        for name, value in router_class.fixed.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(f"router {self.router!r} needs {name}={value}, got {name}={given}; "
                                 f"drop --{name} (or pick another router)")
            setattr(self, name, value)
        for name, value in router_class.defaults.items():
            if getattr(self, name) is None and name not in targeted:
                setattr(self, name, value)
        for name in ('aux_loss_coef', 'z_loss_coef', 'var_loss_coef', 'ortho_loss_coef', 'dynamic_loss_coef'):
            if getattr(self, name) is None and name not in targeted:
                setattr(self, name, 0.0)
        if self.top_k is not None and not 1 <= self.top_k <= self.n_exp:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_exp={self.n_exp}")
        self.check_variable_k(router_class)
        for name in ('capacity_factor', 'eval_capacity_factor'):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be > 0, or None for dropless routing")
        if self.eval_capacity_factor is None:
            self.eval_capacity_factor = self.capacity_factor
        if self.ortho_loss_target is not None or self.ortho_loss_coef > 0:
            self.check_ortho_loss(router_class)
        if self.balance_scope not in ('batch', *router_class.balance_scopes):
            able = ', '.join(name for name, cls in ROUTERS.items() if self.balance_scope in cls.balance_scopes)
            raise ValueError(f"{scope_given}: router {self.router!r} has no Switch balance loss to take "
                             f"{BALANCE_SCOPES[self.balance_scope]}; use one of {able} (or balance_scope='batch')")

    def read_balance_scope(self):
        """balance_scope, checked, with aux_loss_per_sequence=True read as 'sequence' (configs and
        checkpoints written before balance_scope). The two fields then agree, so a run started
        from a checkpoint can replace either (replaced_by). Returns the setting as the user gave it."""
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope={self.balance_scope!r} must be one of "
                             f"{', '.join(map(repr, BALANCE_SCOPES))}; e.g. --balance_scope=global")
        if self.aux_loss_per_sequence:
            if self.balance_scope == 'global':
                raise ValueError("aux_loss_per_sequence=True and balance_scope='global' contradict each other; "
                                 "drop --aux_loss_per_sequence (it means balance_scope='sequence')")
            self.balance_scope = 'sequence'
            return "aux_loss_per_sequence=True"
        self.aux_loss_per_sequence = self.balance_scope == 'sequence'
        return f"balance_scope={self.balance_scope!r}"

    def check_variable_k_settings(self):
        """The settings of topp, remoe and null experts that are wrong whatever the router."""
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]; give the probability mass a token's experts "
                             f"must reach, e.g. --top_p=0.4")
        if self.remoe_l1_init <= 0 or self.remoe_l1_multiplier < 1:
            raise ValueError(f"remoe_l1_init={self.remoe_l1_init}, remoe_l1_multiplier={self.remoe_l1_multiplier}: "
                             f"lambda_0 must be > 0 and alpha >= 1; the defaults are --remoe_l1_init=1e-8 "
                             f"--remoe_l1_multiplier=1.2")
        if self.n_null_exp < 0 or self.null_balance_weight < 0:
            raise ValueError(f"n_null_exp={self.n_null_exp}, null_balance_weight={self.null_balance_weight}: "
                             f"both must be >= 0; e.g. --n_null_exp=0 (no null experts)")

    def check_variable_k(self, router_class):
        """max_k, the dynamic loss and null experts, against the router that would use them."""
        if not router_class.variable_k:
            if self.max_k is not None:
                raise ValueError(f"max_k={self.max_k}: router {self.router!r} gives every token a fixed number of "
                                 f"experts; drop --max_k (or use --router=topp or --router=remoe)")
        else:
            if self.max_k is None:
                # twice the experts a token takes on average: room to vary, at twice top-k's compute
                # and memory instead of E / top_k times (the papers' uncapped routing: --max_k=n_exp)
                self.max_k = min(self.n_exp, 2 * self.top_k)
            if not self.top_k <= self.max_k <= self.n_exp:
                raise ValueError(f"max_k={self.max_k} must be between top_k={self.top_k} and n_exp={self.n_exp} "
                                 f"(router {self.router!r} aims at top_k experts per token on average); "
                                 f"drop --max_k for min(n_exp, 2 * top_k), or --max_k={self.n_exp} for no cap")
        if self.dynamic_loss_coef and 'dynamic_loss_coef' not in router_class.loss_settings:
            raise ValueError(f"dynamic_loss_coef={self.dynamic_loss_coef}: only router 'topp' trains with the dynamic "
                             f"loss; drop --dynamic_loss_coef (or use --router=topp)")
        if self.n_null_exp > 0:
            top_k_routers = ', '.join(name for name, cls in ROUTERS.items() if issubclass(cls, TopKRouter))
            if not issubclass(router_class, TopKRouter):
                raise ValueError(f"n_null_exp={self.n_null_exp}: null experts are for the top-k softmax routers "
                                 f"({top_k_routers}), not {self.router!r}; use one of them or --n_null_exp=0")
            if self.balance_scope == 'sequence':
                raise ValueError(f"n_null_exp={self.n_null_exp} with balance_scope='sequence' (or "
                                 f"aux_loss_per_sequence=True): the per-sequence loss has no weight for null experts; "
                                 f"use balance_scope='batch' or 'global'")

    def check_loss_targets(self, router_class):
        """The coefficients that a target will set (left None here, the router calibrates them):
        a target must be > 0, on a loss the router can train with, and not given with its
        coefficient (which one would rule?)."""
        targeted = []
        for coef_name in ('var_loss_coef', 'ortho_loss_coef'):
            target_name = coef_name.replace('_coef', '_target')
            target, coef = getattr(self, target_name), getattr(self, coef_name)
            if target is None:
                continue
            if target <= 0:
                raise ValueError(f"{target_name}={target} must be > 0 (or None: the fixed {coef_name})")
            if coef is not None:
                raise ValueError(f"{coef_name}={coef} and {target_name}={target} both given: the target sets the "
                                 f"coefficient at the first training step; drop --{coef_name} or --{target_name} "
                                 f"(=None drops one that came with the weights you start from)")
            if coef_name in router_class.fixed:
                raise ValueError(f"router {self.router!r} needs {coef_name}={router_class.fixed[coef_name]}, "
                                 f"got {target_name}={target}; drop --{target_name} (or pick another router)")
            targeted.append(coef_name)
        return targeted

    def check_ortho_loss(self, router_class):
        # L_o pairs the top_k outputs of each token (Router.output_losses): every token
        # must have exactly top_k >= 2 experts, none dropped
        problem = None
        if not router_class.exactly_top_k:
            problem = f"router {self.router!r} does not give every token exactly top_k experts"
        elif self.n_null_exp > 0:
            problem = f"n_null_exp={self.n_null_exp}: a slot given to a null expert leaves its token fewer outputs"
        elif self.top_k < 2:
            problem = f"top_k={self.top_k}: a token with one expert has no pair (router {self.router!r})"
        elif self.capacity_factor is not None or self.eval_capacity_factor is not None:
            problem = (f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}: "
                       f"a dropped assignment leaves its token fewer than top_k outputs; use None (dropless)")
        if problem:
            setting = ('ortho_loss_coef', self.ortho_loss_coef) if self.ortho_loss_target is None else \
                ('ortho_loss_target', self.ortho_loss_target)
            raise ValueError(f"{setting[0]}={setting[1]} needs fixed-k token choice without drops: {problem}")

    @staticmethod
    def replaced_by(given):
        """The settings that the ones given replace when a run starts from trained weights
        with the same router (checkpoint.starting_point keeps the source's others): a loss
        target replaces the source's coefficient of that loss, and a coefficient its target."""
        pairs = {'var_loss_coef': 'var_loss_target', 'ortho_loss_coef': 'ortho_loss_target',
                 'balance_scope': 'aux_loss_per_sequence'}
        pairs.update({target: coef for coef, target in pairs.items()})
        return {pairs[name] for name in given if name in pairs}

    @property
    def experts_per_token(self):
        """How many experts a token uses, on average: top_k (for topp and remoe the number
        they are compared at; with null experts, at most), or expert choice's capacity
        factor. The model sizes its experts and counts active parameters with it."""
        return getattr(self, ROUTERS[self.router].sized_by)

    def describe(self):
        """One line for the training log: the router and what it trains with."""
        choice = ROUTERS[self.router].describe_choice(self)
        if self.n_null_exp:
            choice += f", {self.n_null_exp} null experts (balance weight {self.null_balance_weight})"
        losses = []
        for name in ROUTERS[self.router].loss_settings:
            target_name = name.replace('_coef', '_target')
            if getattr(self, target_name, None) is not None:  # the coefficient is not known before step 0
                losses.append(f"{target_name} {getattr(self, target_name):g}")
            elif getattr(self, name):
                scope = {'sequence': ' per sequence', 'global': ' over the global batch'}.get(self.balance_scope, '')
                losses.append(f"{name} {getattr(self, name)}{scope if name == 'aux_loss_coef' else ''}")
        return f"{self.router}, {self.n_exp} experts, {choice}; losses: {', '.join(losses) or 'none'}"


# -----------------------------------------------------------------------------
# Pure loss functions, in the order a router meets them: the balance loss (over the batch,
# or per sequence), the z-loss, Guo et al.'s variance and orthogonality losses; then
# GatePro's competition, which changes the logits instead of adding a loss


def switch_aux_loss(probs, expert_idx, n_exp):
    """Switch Transformer load-balancing loss, eq. (4)-(6) of Fedus et al. 2021 (arXiv 2101.03961):

        L_aux = E * sum_i f_i * P_i

    f_i: fraction of the assignments that went to expert i (counted, no gradient),
    P_i: mean over tokens of the router probability of expert i, from the FULL softmax
         over all E experts (not the top-k renormalised weights: those would hide the
         probability mass the router puts on experts it did not pick).
    Equals 1 when both are uniform; the gradient flows through P only.
    probs [N, E], expert_idx [P] (the chosen experts, any number per token).
    """
    counts = expert_counts(expert_idx, n_exp).to(probs.dtype)
    f = counts / counts.sum().clamp(min=1)
    P = probs.mean(dim=0)
    return n_exp * torch.sum(f * P)


TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32: a denominator floor that changes no normal value


def sequence_balance_loss(scores, topk_idx, seq_len):
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eqs. 17-20),
    without its alpha, averaged over the B = N / seq_len sequences:

        L = sum_i f_i P_i,  f_i = E / (k T) * (number of the T tokens with i in their top-k)
                            P_i = (1/T) sum_t s_ti / sum_j s_tj

    scores [N, E]: the sigmoid affinities, tokens in sequence order; topk_idx [N, k]: the
    top-k of the scores themselves (eq. 18), not the bias-chosen experts. Top-k softmax
    routers with aux_loss_per_sequence pass their softmax (already summing to 1) and the
    experts they picked: per sequence, exactly the Switch loss E * sum_i f_i P_i.
    Equals 1 when both are uniform; the gradient flows through P only."""
    N, n_exp = scores.shape
    k = topk_idx.size(1)
    chosen = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0).view(-1, seq_len, n_exp)
    f = chosen.sum(dim=1) * n_exp / (k * seq_len)                                 # [B, E]
    # clamp: a token whose scores are all below fp32's smallest normal (logits below about -87) would divide 0 by 0
    P = (scores / scores.sum(dim=-1, keepdim=True).clamp(min=TINY)).view(-1, seq_len, n_exp).mean(dim=1)  # [B, E]
    return (f * P).sum(dim=-1).mean()


def global_balance_loss(probs, counts, eta=None):
    """The global-batch balance loss of Qiu et al. 2025 (arXiv 2501.11873, "Demons in the
    Detail", used in Qwen3's MoE): switch_aux_loss with f counted over the global batch
    (every micro-step of the optimizer step, every DDP rank), P over this micro-batch:

        L_aux = E * sum_i eta_i * f_i * P_i,   f_i = counts_i / sum_j counts_j
                                               P_i = mean over the N tokens of probs[:, i]

    probs [N, E]: this micro-batch's full softmax (E: every scored expert, null ones too);
    counts [E]: assignments per expert, from more tokens than probs (Router.global_batch_counts),
    no gradient; eta [E]: a weight per expert (null experts: null_balance_weights), None = 1.
    The gradient flows through P only. With the micro-batch's own counts
    it is switch_aux_loss. A micro-batch holds a few sequences, often of one domain: asked
    to balance within it, the router spreads a code sequence over every expert. Asked to
    balance the global batch, an expert may take most of the code as long as the whole
    batch is balanced, and the paper finds experts that specialise by domain."""
    counts = counts.to(probs.dtype)
    f = counts / counts.sum().clamp(min=1)
    weighted = f * probs.mean(dim=0)
    return probs.size(-1) * torch.sum(weighted if eta is None else eta * weighted)


def z_loss(logits):
    """ST-MoE router z-loss, eq. (5) of Zoph et al. 2022 (arXiv 2202.08906):

        L_z = (1/N) * sum_t (logsumexp_j logits_tj)^2

    Penalises large router logits, which keeps the softmax in a range where bf16
    round-off does not flip the routing.
    """
    return torch.logsumexp(logits, dim=-1).square().mean()


def variance_loss(logits):
    """Variance loss L_v of Guo et al. 2025 (arXiv 2505.22323, sec. 3.2):

        L_v = -(1/N) * sum_t (1/E) * sum_j (s_tj - 1/E)^2,   s_t = softmax(logits_t) over all E

    the population variance of each token's routing distribution across experts, negated:
    minimising L_v makes the router more decisive (a uniform s_t has variance 0).
    logits [N, E], the raw scores BEFORE top-k."""
    probs = F.softmax(logits.float(), dim=-1)
    return -probs.var(dim=-1, unbiased=False).mean()


def ortho_loss(expert_out, eps=1e-6):
    """Orthogonality loss L_o of Guo et al. 2025 (arXiv 2505.22323, sec. 3.1): for each token,
    the squared length of the projection of every selected expert's output onto every other
    one, summed over the ordered pairs (j, k), j != k, and averaged over the N tokens:

        L_o = (1/N) sum_t sum_{j != k} || (<e_tj, e_tk> / (<e_tk, e_tk> + eps)) e_tk ||^2

    expert_out [N, k, d]: the k raw expert outputs E_j(x_t) of token t (before gate
    weighting). Only outputs of the SAME token are paired (the authors' released code
    reshapes so that different tokens get paired; that is not this formula).
    ||c e||^2 = c^2 <e, e>, so the whole sum comes from the per-token Gram matrices."""
    out = expert_out.float()
    gram = out @ out.transpose(1, 2)                    # [N, k, k], gram[t, j, k] = <e_tj, e_tk>
    sq_norm = gram.diagonal(dim1=1, dim2=2)             # [N, k],  <e_tk, e_tk>
    coef = gram / (sq_norm.unsqueeze(1) + eps)          # divide column k by <e_tk, e_tk> + eps
    proj_sq = coef.square() * sq_norm.unsqueeze(1)      # ||coef * e_tk||^2
    off_diagonal = 1.0 - torch.eye(out.size(1), device=out.device)
    return (proj_sq * off_diagonal).sum(dim=(1, 2)).mean()


def gate_similarity(gate_weight):
    """S [E, E]: cosine similarity between the rows of the gate weight W_g [E, d], in fp32,
    without gradient (GatePro, arXiv 2510.13079: S_ij = <w_i, w_j> / (|w_i| |w_j|))."""
    rows = F.normalize(gate_weight.detach().float(), dim=1)
    return rows @ rows.t()


def gatepro_partners(gate_weight):
    """GatePro (arXiv 2510.13079, Algorithm 1): j*(i) = argmax_{j != i} S_ij, S the cosine
    similarity of the rows of the gate weight W_g [E, d]. Directed: j*(j*(i)) need not be
    i. Recomputed from the current weights, without gradient. Returns [E] long."""
    similarity = gate_similarity(gate_weight)
    similarity.fill_diagonal_(-float('inf'))  # an expert is not its own partner
    return similarity.argmax(dim=1)


def gatepro_penalize(logits, gate_weight, penalty):
    """GatePro competition (arXiv 2510.13079, Algorithm 1): for each token, expert i loses
    to its most similar expert j*(i) when its logit is strictly smaller, and a loser's
    logit drops by `penalty`; winners keep theirs:

        l'_ti = l_ti - penalty * [l_ti < l_t,j*(i)]

    In fp32: a penalty of 1e-4 (the paper's literal value) would round away in bf16.
    logits [N, E] (or any per-token scores: gatepro_penalty_on='probs' passes the softmax);
    returns the penalised scores [N, E] (the gradient of the kept scores is unchanged: the
    penalty is a constant)."""
    logits = logits.float()
    partner_logits = logits[:, gatepro_partners(gate_weight)]  # [N, E]: l_t,j*(i) in column i
    return logits - penalty * (logits < partner_logits).float()


# -----------------------------------------------------------------------------
# As many experts as a token needs: top-p's cut and its losses, ReMoE's L1 penalty and
# its coefficient, MoE++'s balance loss with null experts


def top_p_keep(sorted_probs, top_p):
    """Dynamic top-p routing (Huang et al. 2024, arXiv 2403.07652, its "top-p routing"):
    sort a token's expert probabilities from the largest down, and take the fewest experts
    whose probabilities sum to at least p. Candidate j is kept when the candidates before it sum
    to less than p, so the first always is.

        keep_tj = sum_{i < j} P_t,(i) < p,   P_t,(1) >= P_t,(2) >= ...

    sorted_probs [N, m]: each token's m largest probabilities, in decreasing order. Returns
    [N, m] bool. The partial sums are taken as they are (no subtraction), so a prefix that
    reaches p exactly stops there: .5 + .25 reaches .75 with two experts. The authors'
    released code keeps experts until the sum EXCEEDS p (strictly), which takes a third
    expert in that case; the two differ only when a prefix sums to p exactly."""
    mass_before = F.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))  # sum of the candidates before j
    return mass_before < top_p


def dynamic_loss(logits):
    """The dynamic loss of Huang et al. 2024 (arXiv 2403.07652): the entropy of each
    token's routing distribution P = softmax(logits) over all E experts, averaged over the
    N tokens:

        L_d = -(1/N) sum_t sum_i P_ti log P_ti

    Top-p routing would otherwise reach p by spreading P (a uniform P at p = .5 takes half
    of the experts); minimising the entropy makes the router confident, so few experts do."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def selected_balance_loss(probs, expert_idx, used):
    """switch_aux_loss for a router that leaves some of its slots empty (topp): f_i is the
    fraction of the assignments actually made (the used pairs) that went to expert i,

        L_aux = E * sum_i f_i * P_i,   P_i = mean over tokens of probs[:, i] (all E experts)

    probs [N, E]; expert_idx, used [P]. Equals 1 when both are uniform; the gradient flows
    through P only."""
    n_exp = probs.size(-1)
    counts = expert_counts(expert_idx, n_exp, used).to(probs.dtype)
    f = counts / counts.sum().clamp(min=1)
    return n_exp * torch.sum(f * probs.mean(dim=0))


def null_balance_loss(probs, expert_idx, n_exp, tau):
    """MoE++'s heterogeneous load balance loss (Jin et al. 2024, arXiv 2410.07348), in the
    Switch form: the router scores E real and M null experts, and

        L_aux = (E + M) * sum_{i < E + M} eta_i * f_i * P_i,   eta_i = 1 (real), tau (null)

    f_i: fraction of the top-k slots (null ones included) given to expert i, P_i: mean over
    tokens of softmax over all E + M. tau < 1 penalises a null expert's load less, so more
    slots go to null experts (where tau's default comes from: TopKRouter's docstring).
    probs [N, E + M]; expert_idx [P] over all E + M."""
    n_scored = probs.size(-1)
    counts = expert_counts(expert_idx, n_scored).to(probs.dtype)
    f = counts / counts.sum().clamp(min=1)
    return n_scored * torch.sum(null_balance_weights(probs, n_exp, tau) * f * probs.mean(dim=0))


def null_balance_weights(probs, n_exp, tau):
    """eta [E + M] of MoE++'s balance loss: 1 for the E real experts, tau for the M null ones
    (probs [N, E + M] gives M, the dtype and the device)."""
    eta = torch.ones(probs.size(-1), dtype=probs.dtype, device=probs.device)
    eta[n_exp:] = tau
    return eta


def remoe_l1_loss(gates, top_k, balanced=True):
    """ReMoE's sparsity penalty on the ReLU gates G = ReLU(W_g h) [N, E] (Wang et al. 2025,
    arXiv 2412.14711: its adaptive L1 regularisation, and its load-balanced form):

        plain:          L_reg = (1/N) sum_t sum_e G_te                 (the L1 norm of the gates)
        load-balanced:  L_reg = (1/N) sum_t sum_e f_e G_te,   f_e = E / (k N) * #{t : G_te > 0}

    f_e (counted, no gradient) is expert e's share of the active gates, 1 when every expert
    is active for k N / E tokens: a busy expert's gates are pushed down harder. It is the
    Switch loss with the gates in place of the probabilities, as in the ReLU router of the
    authors' Megatron-LM code (read in a repository built on it). The
    paper averages over the layers too; here each layer adds its own term (the losses are
    summed over the MoE layers), a constant factor that the adaptive coefficient absorbs."""
    if not balanced:
        return gates.sum(dim=-1).mean()
    n_tokens, n_exp = gates.shape
    f = (gates > 0).sum(dim=0).to(gates.dtype) * n_exp / (top_k * n_tokens)
    return (gates * f).sum(dim=-1).mean()


def remoe_coefficient_step(coef, sparsity, target_sparsity, multiplier):
    """ReMoE's adaptive L1 coefficient (arXiv 2412.14711), one training step:

        lambda_{i+1} = lambda_i * alpha ^ sign(target - S_i),   target = 1 - k / E

    S_i: the fraction of the gates that were 0 at step i. Too few zeros (too many experts
    run) and lambda grows by alpha; too many and it shrinks; on target it stays."""
    return coef * multiplier ** torch.sign(target_sparsity - sparsity)


def world_size():
    """Processes training one model together (DDP), 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# -----------------------------------------------------------------------------
# Capacity: drop assignments past an expert's capacity (Switch Transformer, sec. 2.2)


def expert_capacity(n_tokens, n_exp, top_k, capacity_factor):
    """Switch eq. (3): capacity = capacity_factor * tokens_per_batch / num_experts, with k
    assignments per token counted as k*N tokens (GShard). At least 1."""
    return max(1, int(capacity_factor * n_tokens * top_k / n_exp))


def capacity_keep_mask(expert_idx, n_exp, capacity):
    """Boolean mask over the P pairs: True for the first `capacity` pairs of each expert,
    in the order the pairs are given. Routers list all first choices before second
    choices, so a token's first choice is dropped last (GShard's priority)."""
    order = torch.argsort(expert_idx, stable=True)
    counts = expert_counts(expert_idx, n_exp)
    group_start = torch.cumsum(counts, 0) - counts
    position_sorted = torch.arange(expert_idx.numel(), device=expert_idx.device) - group_start[expert_idx[order]]
    keep = torch.empty_like(expert_idx, dtype=torch.bool)
    keep[order] = position_sorted < capacity
    return keep


def expert_counts(expert_idx, n_exp, kept=None):
    """[E] long: how many assignments each expert got (kept [P] bool: only those kept).
    Not torch.bincount: on CUDA it reads the largest index back to the host to size its
    output, a sync on every call."""
    ones = torch.ones_like(expert_idx) if kept is None else kept.long()
    return torch.zeros(n_exp, dtype=torch.long, device=expert_idx.device).index_add_(0, expert_idx, ones)


# -----------------------------------------------------------------------------
# Routers


class Router(nn.Module):
    """Base class: a linear gate W_g [E, d] without bias, the losses every router can
    switch on by coefficient, and capacity dropping. Routers compute in fp32 even under
    autocast: bf16 logits tie and flip the top-k choice.

    The whole interface, as the model and the training loop see it:
      forward(h, token_ids, seq_len) -> Routing, with h [N, d] the hidden states of
          N = B*seq_len tokens (B sequences, in order) and token_ids [N] their input token
          ids (for routers that route by identity, like hash)
      output_losses(routing, expert_out, order) -> {name: loss}: losses that need the
          experts' outputs, called by the MoE layer after the experts ran
      step_finished(iter_num, load_counts): after each optimizer step, with this layer's
          assignment counts [E] summed over the global batch (all micro-steps, all ranks);
          for a router whose Routing gives active_gates (ReMoE), those counts instead
      start_global_batch(): after each optimizer step too: balance_scope='global' counts
          the next global batch from zero

    Class attributes that RouterConfig and the model read:
      fixed          settings this router cannot do without (switch: top_k=1)
      defaults       settings it fills, when the user left them None, with its paper's values
      exactly_top_k  every token gets exactly top_k experts (False: expert choice, topp, remoe)
      variable_k     a token takes as many experts as it needs, up to max_k (topp, remoe)
      sized_by       the setting that says how many experts a token uses on average (the
                     experts are sized with it): 'top_k', or expert choice's 'capacity_factor'
      sees_every_layer  step_finished gets the mean of every MoE layer's counts, not its
                     layer's own (ReMoE holds the sparsity of the whole model)
      balance_scopes the balance_scope values beyond 'batch' its Switch balance loss can take
      loss_settings  the coefficients of the losses it can train with (for the log line)
    """
    fixed = {}
    defaults = {}
    exactly_top_k = True
    variable_k = False
    sized_by = 'top_k'
    sees_every_layer = False
    balance_scopes = ()
    loss_settings = ('aux_loss_coef', 'z_loss_coef', 'var_loss_coef', 'ortho_loss_coef')

    @classmethod
    def describe_choice(cls, config):
        """How this router picks, for RouterConfig.describe's log line."""
        return f"top-{config.top_k}" + (f", capacity factor {config.capacity_factor}" if config.capacity_factor else '')

    def __init__(self, config, learned_gate=True):
        super().__init__()
        self.n_exp = config.n_exp
        self.n_null_exp = config.n_null_exp
        self.null_balance_weight = config.null_balance_weight
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.aux_loss_coef = config.aux_loss_coef
        self.balance_scope = config.balance_scope
        if self.balance_scope == 'global':
            # assignments per scored expert since the last optimizer step, all ranks: emptied after
            # each step (start_global_batch), so never checkpointed (saves happen between steps)
            self.register_buffer('global_counts', torch.zeros(config.n_exp + config.n_null_exp, dtype=torch.long),
                                 persistent=False)
        self.z_loss_coef = config.z_loss_coef
        self.var_loss_coef = config.var_loss_coef
        self.ortho_loss_coef = config.ortho_loss_coef
        self.ortho_loss_eps = config.ortho_loss_eps
        self.loss_targets = {'var': config.var_loss_target, 'ortho': config.ortho_loss_target}
        for name, target in self.loss_targets.items():
            if target is not None:
                # the coefficient a target sets (0 = not yet); a buffer, so a resumed run keeps it
                self.register_buffer(f'{name}_loss_scale', torch.zeros(()))
        # the gate scores the real experts, then the null ones (none unless n_null_exp > 0)
        self.gate = nn.Linear(config.n_embd, config.n_exp + config.n_null_exp, bias=False) if learned_gate else None

    def gate_logits(self, h):
        # fp32 matmul outside autocast: the router is tiny, its precision matters
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.linear(h.float(), self.gate.weight.float())

    def standard_losses(self, logits, probs, expert_idx, seq_len=None, used=None):
        """The losses switched on by coefficient. probs=None: this router balances its load
        another way (expert choice, DeepSeek-V3's bias), so no Switch balance loss.
        With null experts the balance loss is MoE++'s (null_balance_loss: logits, probs and
        expert_idx over all E + M scored experts); with empty slots (used [P], topp) f counts
        the assignments made (selected_balance_loss). balance_scope, the tokens it counts:
        'batch': E * sum_i f_i P_i over the micro-batch (switch_aux_loss).
        'sequence': f and P counted within each sequence of seq_len tokens and the B results
            averaged (DeepSeekMoE, arXiv 2401.06066, and DeepSeek-V3 eqs. 17-20:
            sequence_balance_loss). A batch can be balanced while each sequence leans on a few
            experts; this form asks every sequence to spread. expert_idx must then hold
            exactly top_k pairs per token, choice-major.
        'global': f over the global batch, P over the micro-batch (global_balance_loss), in
            training; an eval batch counts itself alone, as 'batch'."""
        losses = {}
        if self.aux_loss_coef > 0 and probs is not None:
            if self.balance_scope == 'global' and self.training:
                # f over the assignments made (used), of every scored expert (null ones included)
                counts = self.global_batch_counts(expert_counts(expert_idx, probs.size(-1), used))
                eta = null_balance_weights(probs, self.n_exp, self.null_balance_weight) if self.n_null_exp else None
                losses['aux'] = self.aux_loss_coef * global_balance_loss(probs, counts, eta)
            elif self.n_null_exp > 0:
                losses['aux'] = self.aux_loss_coef * null_balance_loss(probs, expert_idx, self.n_exp,
                                                                       self.null_balance_weight)
            elif used is not None:
                losses['aux'] = self.aux_loss_coef * selected_balance_loss(probs, expert_idx, used)
            elif self.balance_scope == 'sequence':
                topk_idx = expert_idx.view(self.top_k, -1).t()  # choice-major pairs -> [N, k]
                # no seq_len given (a router called on its own): the N tokens are one sequence
                losses['aux'] = self.aux_loss_coef * sequence_balance_loss(probs, topk_idx, seq_len or probs.size(0))
            else:
                losses['aux'] = self.aux_loss_coef * switch_aux_loss(probs, expert_idx, self.n_exp)
        if self.z_loss_coef > 0:
            losses['z'] = self.z_loss_coef * z_loss(logits)
        if self.loss_on('var'):
            losses['var'] = self.scaled_loss('var', variance_loss(logits))
        return losses

    def global_batch_counts(self, counts):
        """balance_scope='global': the assignment counts [E] of the global batch so far. counts,
        this micro-batch's, are summed over the DDP ranks (the paper's synchronisation: one
        all_reduce of E numbers per layer and micro-step, before the loss is formed) and added
        to the counts of the micro-steps before it in this optimizer step. So at micro-step m
        f counts micro-steps 1..m of every rank, and the last one the whole global batch.
        That is this project's reading of the paper's buffer for gradient accumulation (the
        copies reachable here say only that f is synchronised across micro-batches); for top-k
        routing it is what Megatron-LM's global_aux_loss computes: counts all-reduced over the
        data-parallel ranks, summed into a buffer over the micro-batches, emptied once per
        optimizer step.
        A functional collective: torch.compile traces it, and nothing is read back to the host.
        Every rank must run the same training forwards (train.py's loop does)."""
        if world_size() > 1:
            counts = funcol.all_reduce(counts, 'sum', dist.group.WORLD)
        self.global_counts += counts
        return self.global_counts

    def start_global_batch(self):
        """After each optimizer step (GPT.step_finished): the global-batch balance loss counts
        the next global batch from zero."""
        if self.balance_scope == 'global':
            self.global_counts.zero_()

    def loss_on(self, name):
        """Does this router train with loss `name` ('var', 'ortho'): by a target or a coefficient > 0?"""
        return self.loss_targets[name] is not None or getattr(self, f'{name}_loss_coef') > 0

    def scaled_loss(self, name, loss):
        """coefficient * loss for Guo et al.'s L_v ('var') or L_o ('ortho'). With a fixed
        coefficient, just that. With a target (var_loss_target, ortho_loss_target), the idea of
        the authors' released training code (arXiv 2505.22323; their DeepSeek-MoE model file,
        configs with targets 1e-3 for L_v and 1e-4 for L_o): the coefficient is not fixed but
        set at the first training forward to

            coef = target / |loss at that step|   (detached; then kept for the rest of the run)

        so the term starts at magnitude `target`: +target for L_o >= 0, -target for L_v <= 0
        (coef > 0, so minimising the term still raises the routing variance).
        This project's reading, and where the authors' code differs:
        - every MoE layer's router calibrates its own coefficient on its own loss; their code
          computes one pair of coefficients in the first MoE layer to run and gives every
          other layer the same values (one model-wide scalar each);
        - coef is exactly target / |loss|; theirs is rounded to a power of ten;
        - the loss is the one that trains; theirs calibrates L_o on the gate's rows standing
          in for expert outputs, and L_v with the unbiased variance.
        A step-0 loss of exactly 0 (uniform routing, orthogonal outputs) sets nothing: the
        next training forward tries again. Eval uses the stored coefficient and never sets
        it, so an eval before the first training step reports the term as 0. Under DDP each
        rank calibrates on its own first micro-batch, and after that step train.py gives every
        rank rank 0's coefficients (system.share_loss_scales): only the first step mixes them.
        No host read: torch.where on a 0-d buffer, so the step compiles to one graph."""
        target = self.loss_targets[name]
        if target is None:
            return getattr(self, f'{name}_loss_coef') * loss
        scale = getattr(self, f'{name}_loss_scale')
        if self.training:
            magnitude = loss.detach().abs()
            calibrated = torch.where((scale == 0) & (magnitude > 0), target / magnitude, scale)
            scale.copy_(calibrated)
            scale = calibrated  # a fresh tensor for the product: the buffer may change before the backward
        return scale * loss

    def drop_over_capacity(self, routing):
        """Switch sec. 2.2: each expert takes at most `capacity` assignments; the rest are
        dropped (their tokens keep only the residual). Returns a new Routing in which a
        dropped pair has weight 0 and kept False (it stays in place: Routing); no capacity
        factor = dropless, the same Routing. The losses were computed before: the balance
        loss sees what the router asked for."""
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor is None:
            return routing
        n_tokens = routing.logits.size(0)
        capacity = expert_capacity(n_tokens, self.n_exp, self.top_k, capacity_factor)
        if routing.used is None:
            keep = capacity_keep_mask(routing.expert_idx, self.n_exp, capacity)
        else:
            # empty slots form a group of their own, past the experts: they take no expert's room
            expert_idx = routing.expert_idx.masked_fill(~routing.used, self.n_exp)
            keep = capacity_keep_mask(expert_idx, self.n_exp + 1, capacity) & routing.used
        return replace(routing, weight=torch.where(keep, routing.weight, 0.0), kept=keep)

    def output_losses(self, routing, expert_out, order):
        """Losses on the experts' raw outputs, which exist only after the experts ran:
        Guo et al.'s orthogonality loss L_o (ortho_loss), by ortho_loss_coef or ortho_loss_target.
        expert_out [P, d]: row i is the output for pair order[i] of `routing` (the MoE layer
        runs the pairs sorted by expert). RouterConfig allows L_o only for fixed-k token
        choice without drops, so the P = k*N pairs are choice-major: p = c*N + t."""
        if not self.loss_on('ortho'):
            return {}
        pair_out = expert_out[torch.argsort(order)]  # back to the router's order: argsort inverts a permutation
        n_tokens = routing.logits.size(0)
        per_token = pair_out.view(self.top_k, n_tokens, -1).transpose(0, 1)  # [N, k, d]
        return {'ortho': self.scaled_loss('ortho', ortho_loss(per_token, self.ortho_loss_eps))}

    def step_finished(self, iter_num, load_counts):
        """Called by the training loop after the optimizer step of iteration iter_num.
        Routers with state that is not learned by gradient (DeepSeek-V3's bias) or that
        changes with the training step (GatePro's window) update it here."""
        pass


def flatten_choices(topk_idx, topk_weight):
    """[N, k] choices -> flat pairs, choice-major: all first choices, then all second
    choices, ... so capacity dropping removes later choices first."""
    N, k = topk_idx.shape
    token_idx = torch.arange(N, device=topk_idx.device).repeat(k)
    return token_idx, topk_idx.t().reshape(-1), topk_weight.t().reshape(-1)


class TopKRouter(Router):
    """Top-k softmax routing (Shazeer et al. 2017, arXiv 1701.06538, without the noise;
    the form used by Mixtral and OLMoE).

        s_t = softmax(W_g h_t) over all E experts,  keep the k largest s_tj

    Defaults: top_k = 2; renormalize = True divides the kept k weights by their sum
    (Mixtral, arXiv 2401.04088), False keeps the raw softmax values (OLMoE, arXiv
    2409.02060). Losses: aux_loss_coef = 0.01 (Switch balance loss) and z_loss_coef =
    0.001 (ST-MoE z-loss), OLMoE's two coefficients.
    Subclasses change the logits (gate_logits) or the scores the top-k is taken on
    (choice_logits); the balance loss always sees the plain softmax of the logits.

    Null experts (n_null_exp = M > 0; this class and every subclass): zero-computation
    experts, MoE++'s "zero expert" E(x) = 0 (Jin et al. 2024, arXiv 2410.07348; LongCat-Flash,
    arXiv 2509.01322, has zero-computation experts too). The gate scores E + M experts, the
    softmax and the top-k run over all of them, and a slot that goes to a null expert runs
    nothing and adds nothing: y = sum over the token's real experts of weight * E_i(x), the
    weights as without nulls (renormalize divides by the sum over all k slots, null ones
    included, so a null slot takes its share away). A token uses 0 to k real experts; with
    all k slots null its MoE output is exactly 0 (the residual alone). Fixed shapes: the k
    slots stay, a null one as an empty slot (used = kept = False, weight 0; its expert_idx
    is 0, read nowhere). Balance: MoE++'s heterogeneous balance loss (null_balance_loss)
    replaces the Switch loss, f and P over all E + M, a null expert's term weighted by
    tau = null_balance_weight. Not read from the paper: the default tau = 0.75, the value
    MoE++ settles on in its tau sweep as this project's author remembers it, unconfirmed:
    the copies of the paper reachable here held only its abstract and introduction, and
    its released code (SkyworkAI/MoE-plus-plus, inference only) has no loss. The form
    sum eta_i f_i P_i comes from an independent re-implementation, not from the paper
    either. LongCat-Flash balances instead with a per-expert bias
    steered toward a target number of real experts, which is not implemented.
    The metrics see the real experts only: Routing.logits and gate_weight are their columns
    and rows, a null choice is no expert's load and no capacity drop; it shows as fewer real
    experts per token (metrics.RoutingStats' experts_per_token). Capacity counts real
    assignments only. MoE++'s released code differs from the reading above in one way: it
    zeroes the zero expert's weight and divides the others by their sum, so a token that
    sends one of two slots to the zero expert gives its real expert weight 1.
    """
    defaults = {'top_k': 2, 'renormalize': True, 'aux_loss_coef': 0.01, 'z_loss_coef': 0.001}
    balance_scopes = ('sequence', 'global')

    def __init__(self, config):
        super().__init__(config)
        self.renormalize = config.renormalize

    def choice_logits(self, logits):
        """The scores the top-k is taken on (GatePro penalises the losers' logits)."""
        return logits

    def choose(self, logits):
        """Each token's k experts [N, k] and their weights [N, k]."""
        choice = self.choice_logits(logits)
        # top-k on logits, not on probabilities: in fp32 the softmax of logits far below the
        # maximum underflows to exactly 0, and top-k would then break those ties by index
        topk_logit, topk_idx = torch.topk(choice, self.top_k, dim=-1)
        if self.renormalize:
            topk_weight = F.softmax(topk_logit, dim=-1)  # = p_i / sum of the kept p_j
        else:
            topk_weight = F.softmax(choice, dim=-1).gather(1, topk_idx)
        return topk_idx, topk_weight

    def forward(self, h, token_ids=None, seq_len=None):
        # gate_logits, standard_losses and drop_over_capacity: Router, above; flatten_choices: just above
        logits = self.gate_logits(h)
        topk_idx, topk_weight = self.choose(logits)
        token_idx, expert_idx, weight = flatten_choices(topk_idx, topk_weight)
        losses = self.standard_losses(logits, F.softmax(logits, dim=-1), expert_idx, seq_len)
        if self.n_null_exp == 0:
            routing = Routing(token_idx, expert_idx, weight, logits.detach(), losses,
                              gate_weight=self.gate.weight.detach())
        else:
            real = expert_idx < self.n_exp  # a slot given to a null expert stays, empty
            routing = Routing(token_idx, expert_idx.masked_fill(~real, 0), torch.where(real, weight, 0.0),
                              logits[:, :self.n_exp].detach(), losses,
                              gate_weight=self.gate.weight[:self.n_exp].detach(), used=real)
        return self.drop_over_capacity(routing)


class GateProRouter(TopKRouter):
    """GatePro (Zheng et al. 2025, arXiv 2510.13079, Algorithm 1): top-k routing in which
    every expert competes with its most similar expert (cosine of the gate rows), so two
    experts with nearly the same gate vector are not both picked for one token.

        l = W_g h (no bias),  l' = gatepro_penalize(l, W_g, penalty),
        top-k of l', weights = softmax of l' over the k selected   (the paper's eqs. 2-4, 9-10)

    The softmax over the k selected is renormalize=True, the default (False keeps the
    softmax of the penalised logits over all E, which is not the paper's).

    gatepro_penalty (lambda), default 1e4: the paper writes "typically lambda = 1e-4" yet
    calls the penalty aggressive, one that "effectively eliminates the losing expert".
    The default takes the elimination reading: a loser is picked only when fewer than k
    experts win; the free slots then go to the losers with the largest logits (the top-k
    is taken on l', not on its softmax, whose losers all underflow to 0), with weight ~0.
    The literal 1e-4 only reorders logits within 1e-4 of each other (near-ties), and would
    round away in bf16: it is applied in fp32.
    gatepro_penalty_on, where lambda acts: 'logits' (default) subtracts it from l = W_g h
    before any softmax, which is how Algorithm 1 was read when this router was written.
    Which one the paper means is not settled here: when the other reading was added, the
    copies of the paper this project could reach held its abstract and introduction only,
    not Algorithm 1, so no sentence of it is quoted and 'probs' is a knob to compare with,
    not a ruling (RESULTS.md, question 6: at 128 experts the two give the same verdict).
    'probs' subtracts lambda from s = softmax(l) over all E, takes the top-k of s', and
    weighs with s' (clamped at 0; divided by its sum over the k when renormalize). The losers are the
    same either way (the softmax keeps each token's order); only the scale of the step
    differs. With the literal 1e-4: p_i - p_m <= p_i (l_i - l_m) for p_m < p_i, so on
    probabilities a loser i drops below every expert less than 1e-4 / p_i below it in
    logit, a window 1/p_i times (E times, at uniform routing) wider than on logits. With
    1e4 both pick the same experts (every loser below every winner) and weigh the winners
    alike; a chosen loser weighs exactly 0 on probabilities, ~0 on logits.
    Hot-swap: the competition is on for gatepro_start_iter <= iter < gatepro_end_iter
    (None = no end), and outside it the router is exactly topk. The router counts the
    finished training steps itself (step_finished) and keeps the count in the checkpoint.
    Losses: topk's (GatePro adds none). The balance loss takes P from the softmax of the
    UNpenalised logits (what the gate learns from), f from the assignments actually made.
    """

    def __init__(self, config):
        super().__init__(config)
        self.penalty = config.gatepro_penalty
        self.penalty_on = config.gatepro_penalty_on
        self.start_iter = config.gatepro_start_iter
        self.end_iter = config.gatepro_end_iter
        # the iteration the next forward belongs to (training steps finished so far): a buffer,
        # so it is checkpointed, and a tensor, so that torch.compile does not specialise the
        # graph on its value (a Python int would recompile it every step)
        self.register_buffer('iter_num', torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._count_from_extra_state)

    def step_finished(self, iter_num, load_counts):
        self.iter_num.fill_(iter_num + 1)

    @staticmethod
    def _count_from_extra_state(state_dict, prefix, *args):
        # checkpoints written before the count was a buffer hold it as the module's extra state
        if prefix + '_extra_state' in state_dict and prefix + 'iter_num' not in state_dict:
            state_dict[prefix + 'iter_num'] = torch.tensor(int(state_dict.pop(prefix + '_extra_state')))

    def competing(self):
        """0-d bool tensor: is the competition on at this iteration? (no host read)"""
        on = self.iter_num >= self.start_iter
        return on if self.end_iter is None else on & (self.iter_num < self.end_iter)

    def choice_logits(self, logits):
        if self.penalty_on == 'probs':
            return logits  # the top-k of the plain logits, for outside the window (choose)
        # outside the window the plain logits, exactly; torch.where, not an if, keeps one graph
        return torch.where(self.competing(), gatepro_penalize(logits, self.gate.weight, self.penalty), logits)

    def choose(self, logits):
        topk_idx, topk_weight = super().choose(logits)
        if self.penalty_on == 'logits':
            return topk_idx, topk_weight
        # lambda on the probabilities: the losers are the same (softmax keeps each token's
        # order), only the step is on another scale. A chosen loser whose probability is below
        # lambda weighs 0; the sum is > 0, as the token's argmax always wins
        scores = gatepro_penalize(F.softmax(logits, dim=-1), self.gate.weight, self.penalty)
        score, idx = torch.topk(scores, self.top_k, dim=-1)
        weight = score.clamp(min=0)
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        competing = self.competing()
        return torch.where(competing, idx, topk_idx), torch.where(competing, weight, topk_weight)


class OrthoVarRouter(TopKRouter):
    """Top-k routing with the two losses of Guo et al. 2025 (arXiv 2505.22323) switched on:
    L = L_lm + alpha L_aux + beta L_o + gamma L_v, summed over the MoE layers.

    L_v (var_loss_coef = gamma) is variance_loss on the logits of all E experts; L_o
    (ortho_loss_coef = beta) is ortho_loss on the experts' outputs, so the router computes
    it in output_losses, after the experts ran. Both are Router features that work with
    any fixed-k token-choice router; this one only turns them on by default.
    Defaults beta = 0.1, gamma = 0.3: the authors' released code calibrates beta and gamma
    so that the initial terms are about 1e-4 and 1e-3, and on the default model these
    values give 1e-4 and 9e-4 at step 0; in our short sweep (RESULTS.md) they beat plain
    topk, while 10x both made the routing one-hot and collapsed. ortho_loss_target and
    var_loss_target calibrate them instead (Router.scaled_loss: each term starts at its
    target). alpha = aux_loss_coef and the z-loss stay topk's (0.01 and 0.001; the paper's
    configs use alpha = 0.001 on the sequence-wise balance loss: aux_loss_per_sequence).
    """
    defaults = {**TopKRouter.defaults, 'ortho_loss_coef': 0.1, 'var_loss_coef': 0.3}


class SwitchRouter(TopKRouter):
    """Switch Transformer routing (Fedus et al. 2021, arXiv 2101.03961): top-1.

        p(x) = softmax(W_g x) (eq. 1),  y = p_i(x) E_i(x) for i = argmax p (eq. 2)

    The weight is the raw probability p_i, not renormalised (renormalised top-1 is always
    1.0 and the router would learn nothing from the LM loss): top_k = 1 and renormalize =
    False are fixed. Capacity (eq. 3): capacity_factor * N / E tokens per expert; the rest
    are dropped and keep only their residual. Defaults: 1.25 in training (one of the
    factors of the paper's Table 1) and 2.0 in eval (more room, fewer drops, when no
    gradient needs the balance). Losses: the balance loss, alpha = aux_loss_coef = 0.01
    (sec. 2.2); no z-loss (it came later, with ST-MoE). switch_jitter, eps = 0.01 by
    default (the paper's "input jitter" exploration strategy): in training only, the router
    input is multiplied by noise uniform in [1 - eps, 1 + eps]; 0 turns it off.
    """
    fixed = {'top_k': 1, 'renormalize': False}
    defaults = {'capacity_factor': 1.25, 'eval_capacity_factor': 2.0, 'aux_loss_coef': 0.01, 'z_loss_coef': 0.0}

    def __init__(self, config):
        super().__init__(config)
        self.jitter = config.switch_jitter

    def gate_logits(self, h):
        if self.training and self.jitter > 0:
            h = h.float() * torch.empty_like(h, dtype=torch.float32).uniform_(1 - self.jitter, 1 + self.jitter)
        return super().gate_logits(h)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538, eqs. 3-5):

        H(x)_i = (x W_g)_i + StandardNormal() * softplus((x W_noise)_i)     (eq. 4)
        G(x) = softmax(KeepTopK(H(x), k))                                    (eqs. 3, 5)

    The noise scale is learned per token and per expert by its own Linear W_noise, and the
    noise is added in training only (in eval H = x W_g). Softmax over the kept k is
    renormalize=True (the default), top_k = 2. Losses: the paper's importance and load
    losses (eqs. 6-10) are not implemented; the Switch loss (aux_loss_coef = 0.01) on
    softmax(H) stands in. No z-loss (the paper has none).
    """
    defaults = {**TopKRouter.defaults, 'z_loss_coef': 0.0}

    def __init__(self, config):
        super().__init__(config)
        self.noise = nn.Linear(config.n_embd, config.n_exp + config.n_null_exp, bias=False)

    def gate_logits(self, h):
        logits = super().gate_logits(h)
        if not self.training:
            return logits
        with torch.autocast(device_type=h.device.type, enabled=False):
            noise_std = F.softplus(F.linear(h.float(), self.noise.weight.float()))
        return logits + torch.randn_like(logits) * noise_std


class ExpertChoiceRouter(Router):
    """Expert choice routing (Zhou et al. 2022, arXiv 2202.09368, sec. 3.2, eq. 1):

        S = softmax(X W_g) over experts [N, E];  each expert takes its top-C tokens by S,
        C = N * capacity_factor / E;  weight of (token t, expert e) = S_te

    Perfectly balanced by construction: no balance loss (aux_loss_coef is fixed at 0) and
    no z-loss, as in the paper. A token may get 0 to E experts, capacity_factor of them on
    average (default 2, the paper's EC-CF2; eval uses eval_capacity_factor, by default the
    same). There is no top_k: giving one is an error.

    NOT CAUSAL: an expert picks among all N = B*T tokens of the batch, so whether an early
    token is picked depends on the later tokens (and on the other sequences). A decoder
    trained this way sees the future through the routing; its val loss is not comparable
    with the causal routers', and generation token by token differs from training.
    """
    fixed = {'top_k': None, 'aux_loss_coef': 0.0}
    defaults = {'capacity_factor': 2.0, 'z_loss_coef': 0.0}
    exactly_top_k = False
    sized_by = 'capacity_factor'

    @classmethod
    def describe_choice(cls, config):
        return f"experts pick tokens, capacity factor {config.capacity_factor}"

    def forward(self, h, token_ids=None, seq_len=None):
        logits = self.gate_logits(h)
        probs = F.softmax(logits, dim=-1)
        N = h.size(0)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = min(N, expert_capacity(N, self.n_exp, 1, capacity_factor))
        weight, token_idx = torch.topk(probs.t(), capacity, dim=1)  # [E, C]: each expert's C best tokens
        expert_idx = torch.arange(self.n_exp, device=h.device).repeat_interleave(capacity)
        losses = self.standard_losses(logits, None, expert_idx)
        # the capacity bounds each expert's load already: nothing to drop
        return Routing(token_idx.reshape(-1), expert_idx, weight.reshape(-1), logits.detach(), losses,
                       gate_weight=self.gate.weight.detach())


class AuxFreeRouter(Router):
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2; Wang et al.
    2024, Loss-Free Balancing, arXiv 2408.15664):

        s_t = sigmoid(W_g h_t)                                                    (eq. 15)
        pick the top-k of s_t + b; b only picks, it never weighs                   (eq. 16)
        weights = scale * s_ti / sum_{j picked} s_tj                               (eq. 13)
        after each optimizer step: b_i += gamma * sign(mean load - load_i)         (sec. 2.1.2)

    b is a buffer (no gradient; checkpointed, broadcast under DDP) updated from the load of
    the whole global batch by step_finished. gamma = aux_free_update_rate, 0.001
    (DeepSeek-V3 sec. 4.2; Loss-Free Balancing's u). top_k = 2 by default.
    Losses: no Switch balance loss (fixed at 0: the bias balances) and no z-loss (neither
    paper has one); only the optional sequence-wise loss of eqs. 17-20 with alpha =
    aux_free_seq_loss_coef, default 1e-4 (DeepSeek-V3 sec. 4.2; 0 = Loss-Free Balancing's
    pure form). aux_free_scale multiplies the weights (DeepSeek-V3's released config uses
    2.5; default 1.0 so the weights sum to 1 like topk's). Routing.logits are the
    pre-sigmoid scores.
    """
    fixed = {'aux_loss_coef': 0.0}
    defaults = {'top_k': 2, 'z_loss_coef': 0.0}
    loss_settings = Router.loss_settings + ('aux_free_seq_loss_coef',)

    def __init__(self, config):
        super().__init__(config)
        self.update_rate = config.aux_free_update_rate
        self.seq_loss_coef = config.aux_free_seq_loss_coef
        self.scale = config.aux_free_scale
        self.register_buffer('expert_bias', torch.zeros(config.n_exp))

    def forward(self, h, token_ids=None, seq_len=None):
        logits = self.gate_logits(h)
        scores = torch.sigmoid(logits)
        _, topk_idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)  # b picks (eq. 16)
        topk_score = scores.gather(1, topk_idx)
        # clamp: when every picked score is below fp32's smallest normal (logits below about -87), weights ~0, not 0/0
        topk_weight = self.scale * topk_score / topk_score.sum(dim=-1, keepdim=True).clamp(min=TINY)
        token_idx, expert_idx, weight = flatten_choices(topk_idx, topk_weight)
        losses = self.standard_losses(logits, None, expert_idx)
        if self.seq_loss_coef > 0:
            # eq. 18 counts the top-k of the affinities themselves: the bias is not in f
            _, unbiased_topk_idx = torch.topk(scores, self.top_k, dim=-1)
            losses['seq_aux'] = self.seq_loss_coef * sequence_balance_loss(scores, unbiased_topk_idx, seq_len or h.size(0))
        routing = Routing(token_idx, expert_idx, weight, logits.detach(), losses, gate_weight=self.gate.weight.detach())
        return self.drop_over_capacity(routing)

    @torch.no_grad()
    def step_finished(self, iter_num, load_counts):
        load = load_counts.to(self.expert_bias.device, torch.float32)
        # overloaded experts (load above the mean) lose bias, underloaded ones gain it
        self.expert_bias += self.update_rate * torch.sign(load.mean() - load)


class HashRouter(Router):
    """Hash layers (Roller et al. 2021, arXiv 2106.04426, "Random Hash"): a fixed
    random map from token id to expert, drawn once from a generator seeded with hash_seed
    and stored as a buffer; top-1 with weight 1.0; nothing is learned and there is no
    loss (every loss coefficient is fixed at 0). A lower bound for learned routers. Every
    MoE layer gets the same map (same seed).
    Routing.logits are honest one-hot scores: 0 for the hashed expert, -1e4 (log 0 for
    practical purposes) elsewhere, so the metrics see a router with entropy 0.
    """
    fixed = {'top_k': 1, 'aux_loss_coef': 0.0, 'z_loss_coef': 0.0, 'var_loss_coef': 0.0, 'ortho_loss_coef': 0.0}

    def __init__(self, config):
        super().__init__(config, learned_gate=False)
        generator = torch.Generator().manual_seed(config.hash_seed)
        self.register_buffer('expert_of_token', torch.randint(0, config.n_exp, (config.vocab_size,), generator=generator))

    def forward(self, h, token_ids=None, seq_len=None):
        if token_ids is None:
            raise ValueError("the hash router routes by token id: call it with token_ids [N]")
        N = h.size(0)
        expert_idx = self.expert_of_token[token_ids]
        token_idx = torch.arange(N, device=h.device)
        weight = torch.ones(N, device=h.device)
        logits = torch.full((N, self.n_exp), -1e4, device=h.device).scatter_(1, expert_idx.unsqueeze(1), 0.0)
        return self.drop_over_capacity(Routing(token_idx, expert_idx, weight, logits))


class TopPRouter(Router):
    """Dynamic top-p routing (Huang et al. 2024, ACL, arXiv 2403.07652 "Harder Tasks Need
    More Experts: Dynamic Routing in MoE Models"; the authors' released code,
    ZhenweiAn/Dynamic_MoE): a token takes the fewest experts, most probable first, whose
    probabilities reach p, so a confident token takes one expert and an unsure one several.

        P = softmax(W_g h) over all E;  sort P down;  keep the fewest whose sum >= p  (top_p_keep)
        y = sum over the kept i of P_i * E_i(x)       (the raw P_i: not renormalised)

    The weights are the raw probabilities: the authors' code multiplies each kept expert's
    output by its softmax probability and divides by nothing (renormalize = False, the
    default here; True divides by the kept experts' sum). p = top_p, default 0.4: the
    default of the authors' released configuration class (top_p_threshold=0.4). The
    summaries of the paper say the set's sum "exceeds" p and the code compares strictly;
    this router takes ">= p" (top_p_keep): they differ only when a prefix sums to p exactly.
    Losses (L = L_lm + alpha L_b + beta L_d):
      L_d, the dynamic loss (dynamic_loss): the entropy of P, beta = dynamic_loss_coef,
          without it the router learns to spread P and take many experts;
      L_b, a balance loss: the Switch form with f over the assignments actually made
          (selected_balance_loss), alpha = aux_loss_coef.
    Not read from the paper: the defaults alpha = 0.01 and beta = 1e-4, and the exact form
    of the balance loss. They are this project's choice (beta as its author remembers the
    paper, unconfirmed): the copies of the paper reachable here (its abstract and summaries
    of the method) do not give them, and the authors' released code is inference only, with
    no loss. No z-loss.
    FIXED SHAPES: each token gets max_k slots, its max_k most probable experts; a slot past
    the cut is empty (Routing: used = kept = False, weight 0), so memory and GPU compute are
    O(N * max_k * d) whatever the router picks. Default max_k = min(E, 2 * top_k), this
    project's choice, not the paper's: twice the average it aims at leaves a token room to
    take more experts, while compute and memory stay at twice top-k's (uncapped, 64 experts
    would cost 32 times top-2's). A token that would need more than max_k takes its max_k
    best, and Routing.cap_bound marks it (the metrics' cap_bound_frac: watch it; a cap that
    binds often changes the routing). --max_k=E is the authors' code: no cap.
    top_k (default 2) routes nothing: it is the number of experts the model is sized for
    and counts as active (the paper compares with top-2) and that capacity assumes.
    """
    defaults = {'top_k': 2, 'renormalize': False, 'aux_loss_coef': 0.01, 'z_loss_coef': 0.0, 'dynamic_loss_coef': 1e-4}
    exactly_top_k = False
    variable_k = True
    balance_scopes = ('global',)
    loss_settings = Router.loss_settings + ('dynamic_loss_coef',)

    @classmethod
    def describe_choice(cls, config):
        return (f"top-p {config.top_p}, at most {config.max_k} experts a token, sized for {config.top_k}"
                + (f", capacity factor {config.capacity_factor}" if config.capacity_factor else ''))

    def __init__(self, config):
        super().__init__(config)
        self.top_p = config.top_p
        self.max_k = config.max_k
        self.renormalize = config.renormalize
        self.dynamic_loss_coef = config.dynamic_loss_coef

    def forward(self, h, token_ids=None, seq_len=None):
        logits = self.gate_logits(h)
        probs = F.softmax(logits, dim=-1)
        # the max_k candidates, most probable first: the top-k of the logits (as in TopKRouter:
        # probabilities that underflow to 0 would tie, and top-k would break ties by index)
        _, candidate_idx = torch.topk(logits, self.max_k, dim=-1)
        candidate_prob = probs.gather(1, candidate_idx)
        picked = top_p_keep(candidate_prob, self.top_p)
        weight = torch.where(picked, candidate_prob, 0.0)
        if self.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True).clamp(min=TINY)  # the first candidate is always kept
        # the cap binds when even the max_k most probable experts do not reach p (never without a cap)
        cap_bound = candidate_prob.sum(dim=-1) < self.top_p if self.max_k < self.n_exp else \
            torch.zeros(h.size(0), dtype=torch.bool, device=h.device)
        token_idx, expert_idx, weight = flatten_choices(candidate_idx, weight)
        used = picked.t().reshape(-1)  # choice-major, like the pairs
        losses = self.standard_losses(logits, probs, expert_idx, seq_len, used=used)
        if self.dynamic_loss_coef > 0:
            losses['dynamic'] = self.dynamic_loss_coef * dynamic_loss(logits)
        routing = Routing(token_idx, expert_idx, weight, logits.detach(), losses, gate_weight=self.gate.weight.detach(),
                          used=used, cap_bound=cap_bound)
        return self.drop_over_capacity(routing)


class ReMoERouter(Router):
    """ReLU routing (Wang et al. 2025, ICLR, arXiv 2412.14711 "ReMoE: Fully Differentiable
    Mixture-of-Experts with ReLU Routing"; the authors' code is Megatron-LM based,
    thu-ml/ReMoE): the gate is a ReLU, every expert whose gate is positive runs, and an L1
    penalty whose coefficient adapts at each step holds the number that run at top_k of E
    on average. No top-k, no softmax: the routing is continuous, so the gate learns from
    every expert's output.

        G = ReLU(W_g h)  [N, E];   y = sum_e G_e * E_e(x)       (no normalisation)
        L = L_lm + lambda_i * L_reg            (L_reg: remoe_l1_loss, load-balanced by default)
        after step i: lambda_{i+1} = lambda_i * alpha ^ sign((1 - k/E) - S_i)   (remoe_coefficient_step)

    S_i: the sparsity at step i, the fraction of the gates that were 0. Defaults:
    lambda_0 = remoe_l1_init = 1e-8 and alpha = remoe_l1_multiplier = 1.2, the argument
    defaults (--moe-relu-l1-reg-coeff-init, --moe-relu-l1-reg-coeff-multiplier) of a public
    fork of the authors' Megatron-LM code (neilwen987/ReMoE-ts, whose README is the
    authors'); not read from the paper, nor from thu-ml/ReMoE itself, which could not be
    read here. The load-balanced L1 (remoe_balanced_l1 = True: that code's ReLU router
    always takes it); target k = top_k = 2. Sources: the copies of the paper reachable here
    held its abstract and introduction only; the update rule and the losses above are as
    in the ReLU router of that code (which also counts its sparsity over every positive
    gate) and in summaries of the paper's sections on adaptive L1 regularisation and load
    balancing.
    There lambda is ONE coefficient for the whole model (the code shares it among the
    layers) and S_i the sparsity of all layers together, so some layers may use more
    experts than others.
    Here each layer keeps its own lambda buffer, but every layer updates it from the same
    number, the mean over the MoE layers of their counts (sees_every_layer: GPT.step_finished
    passes it), so the copies stay equal: one lambda, as in the paper.
    S_i counts every positive gate of the [N, E] gate tensor (Routing.active_gates, on the
    device: no sync), whether the cap let its expert run or not: a binding cap must not
    hide from lambda that the gates are too dense. step_finished gets these counts for the
    whole global batch (metrics.RoutingStats.router_counts; under DDP summed over the
    ranks) and divides by the gates computed: the tokens the layer routed in training since
    the last step, times E, times the number of ranks (each rank routes the same number of
    tokens); a step whose counts are all 0 (a skipped, non-finite step) changes nothing.
    lambda is a checkpointed buffer; every DDP rank computes the same value from the same
    global counts. No Switch balance loss (fixed at 0: the L1 balances) and no z-loss.
    FIXED SHAPES: each token gets max_k slots, its max_k largest gates; a gate <= 0 leaves
    its slot empty (used = kept = False, weight 0), so memory and GPU compute are
    O(N * max_k * d). Default max_k = min(E, 2 * top_k), this project's choice, not the
    paper's (there every positive gate runs: --max_k=E, at O(N * E * d), 32 times top-2's
    at 64 experts). A token with more positive gates than max_k keeps its max_k largest
    (Routing.cap_bound marks it: the metrics' cap_bound_frac). Dropless (capacity_factor
    fixed at None): a capacity would drop experts the count needs.
    """
    fixed = {'aux_loss_coef': 0.0, 'renormalize': False, 'capacity_factor': None, 'eval_capacity_factor': None}
    defaults = {'top_k': 2, 'z_loss_coef': 0.0}
    exactly_top_k = False
    variable_k = True
    sees_every_layer = True
    loss_settings = Router.loss_settings + ('remoe_l1_init',)

    @classmethod
    def describe_choice(cls, config):
        return (f"ReLU gates, {config.top_k} of {config.n_exp} active on average, at most {config.max_k} a token "
                f"(L1 coefficient x{config.remoe_l1_multiplier} or /{config.remoe_l1_multiplier} after each step)")

    def __init__(self, config):
        super().__init__(config)
        self.max_k = config.max_k
        self.multiplier = config.remoe_l1_multiplier
        self.balanced = config.remoe_balanced_l1
        self.register_buffer('l1_coef', torch.tensor(float(config.remoe_l1_init)))  # lambda: checkpointed
        # tokens routed in training since the last step (all micro-steps): not checkpointed, 0 after each step
        self.register_buffer('tokens_seen', torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, h, token_ids=None, seq_len=None):
        logits = self.gate_logits(h)
        gates = F.relu(logits)
        candidate_logit, candidate_idx = torch.topk(logits, self.max_k, dim=-1)  # the max_k largest gates
        picked = candidate_logit > 0
        positive = logits.detach() > 0  # [N, E]: every gate that wants its expert, cap or no cap
        cap_bound = positive.sum(dim=-1) > self.max_k
        token_idx, expert_idx, weight = flatten_choices(candidate_idx, F.relu(candidate_logit))
        losses = self.standard_losses(logits, None, expert_idx)
        losses['l1'] = self.l1_coef * remoe_l1_loss(gates, self.top_k, self.balanced)
        if self.training:
            self.tokens_seen += h.size(0)
        return Routing(token_idx, expert_idx, weight, logits.detach(), losses, gate_weight=self.gate.weight.detach(),
                       used=picked.t().reshape(-1), cap_bound=cap_bound, active_gates=positive.sum(dim=0))

    @torch.no_grad()
    def step_finished(self, iter_num, load_counts):
        # load_counts: the positive gates per expert (Routing.active_gates), mean over the layers
        active = load_counts.to(self.l1_coef.device, torch.float32).sum()
        gates = self.tokens_seen.float() * world_size() * self.n_exp      # gates computed, global batch
        sparsity = 1 - active / gates.clamp(min=1)
        stepped = remoe_coefficient_step(self.l1_coef, sparsity, 1 - self.top_k / self.n_exp, self.multiplier)
        self.l1_coef.copy_(torch.where((active > 0) & (gates > 0), stepped, self.l1_coef))
        self.tokens_seen.zero_()


ROUTERS = {
    'topk': TopKRouter,
    'gatepro': GateProRouter,
    'ortho_var': OrthoVarRouter,
    'switch': SwitchRouter,
    'noisy_topk': NoisyTopKRouter,
    'expert_choice': ExpertChoiceRouter,
    'aux_free': AuxFreeRouter,
    'hash': HashRouter,
    'topp': TopPRouter,
    'remoe': ReMoERouter,
}


def build_router(config):
    """The router of one MoE layer, from the model's GPTConfig: its RouterConfig fields,
    plus n_embd (the gate's width) and vocab_size (hash)."""
    return ROUTERS[config.router](config)
