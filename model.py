"""
A GPT-2 style decoder whose feed-forward blocks can be Mixtures of Experts.

Data flow of one MoE feed-forward (N = B*T tokens, k experts per token):
    h [N, d] -> router -> P (token, expert, weight) pairs      (routers.py)
    sort pairs by expert -> each expert runs on its contiguous group of tokens
    y[token] += weight * expert_out  (index_add back to [N, d])
Cost is O(N*k*d) memory and compute: no one-hot [N, E, capacity] dispatch tensors.

References:
1) GPT-2: https://github.com/openai/gpt-2 (architecture, init)
2) nanoGPT: https://github.com/karpathy/nanoGPT (the shape of this file)
3) Switch Transformer, arXiv 2101.03961; GShard, arXiv 2006.16668 (capacity)
4) DeepSeekMoE, arXiv 2401.06066 (shared experts)
"""

import ctypes
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from routers import ROUTERS, build_router, capacity_keep_mask, expert_capacity, expert_counts, ortho_loss


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's LayerNorm cannot drop only the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# torch's grouped GEMM: one kernel runs every expert on its own rows (CUDA, bf16, sm80+).
# Public as F.grouped_mm in recent torch, private torch._grouped_mm before; absent in old versions.
grouped_mm = getattr(F, 'grouped_mm', None) or getattr(torch, '_grouped_mm', None)
GROUP_ALIGN = 8  # rows: 16 bytes of bf16. The weight gradient contracts over each group's rows,
                 # so every group must start on a 16-byte boundary (torchtitan pads to 8 for bf16)


def mm_per_expert(lhs, rhs, out):
    """out[e] = lhs[e] @ rhs[e] for sequences of per-expert matrices; out holds views to write into."""
    for a, b, o in zip(lhs, rhs, out):
        torch.mm(a, b, out=o)


class ExpertLoop(torch.autograd.Function):
    """gelu(x_e @ w_fc[e]) @ w_proj[e] for each expert's contiguous rows x_e of x: one matmul
    per expert, in forward and in a backward written out by hand.

    Why not plain autograd over w_fc.unbind(0): its backward makes one [d, h] gradient per
    expert and then stacks them into [E, d, h], a second copy of every expert weight each
    step. Here each expert's weight gradient is written straight into its slice of one
    [E, d, h] tensor, the GELU runs once over all rows, and nothing is concatenated."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, counts):
        sizes = counts.tolist()  # a host sync: fine on CPU, the reason CUDA runs the grouped GEMM
        pre = x.new_empty(x.size(0), w_fc.size(2))
        mm_per_expert(x.split(sizes), w_fc.unbind(0), pre.split(sizes))
        act = F.gelu(pre)
        y = x.new_empty(x.size(0), w_proj.size(2))
        mm_per_expert(act.split(sizes), w_proj.unbind(0), y.split(sizes))
        ctx.save_for_backward(x, w_fc, w_proj, pre, act)
        ctx.sizes = sizes
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w_fc, w_proj, pre, act = ctx.saved_tensors
        rows = lambda t: t.split(ctx.sizes)  # each expert's block of rows
        rows_t = lambda t: t.t().split(ctx.sizes, 1)  # the same blocks, transposed (views)
        grad_y = grad_y.contiguous()
        grad_w_proj, grad_act = torch.empty_like(w_proj), torch.empty_like(act)
        mm_per_expert(rows_t(act), rows(grad_y), grad_w_proj.unbind(0))  # act_e^T @ dy_e
        mm_per_expert(rows(grad_y), w_proj.transpose(1, 2).unbind(0), rows(grad_act))  # dy_e @ w_proj[e]^T
        grad_pre = torch.ops.aten.gelu_backward(grad_act, pre)
        grad_w_fc, grad_x = torch.empty_like(w_fc), torch.empty_like(x)
        mm_per_expert(rows_t(x), rows(grad_pre), grad_w_fc.unbind(0))  # x_e^T @ dpre_e
        mm_per_expert(rows(grad_pre), w_fc.transpose(1, 2).unbind(0), rows(grad_x))  # dpre_e @ w_fc[e]^T
        return grad_x, grad_w_fc, grad_w_proj, None  # an expert with no rows gets a zero gradient


class Experts(nn.Module):
    """E feed-forward experts (d -> h -> d, GELU, no bias) with their weights stacked,
    w_fc [E, d, h] and w_proj [E, h, d], so one grouped GEMM can run them all.

    Input: the tokens already sorted by expert, x [P, d], and counts [E] (how many rows
    belong to each expert). Output: [P, d], row for row.

    Two implementations, same result (test_model.py checks it):
      loop:    one matmul per expert (ExpertLoop), any device and dtype. Reads counts on
               the host, so on CUDA it waits for the GPU once per layer.
      grouped: one grouped GEMM for all experts (torch's grouped_mm), in bf16, no host sync.
    'auto' picks grouped on a CUDA GPU of compute capability 8.0 or more when the experts
    run in bf16, torch has grouped_mm and n_embd and expert_hidden are multiples of 8 (the
    kernel wants 16-byte rows); loop everywhere else."""

    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_exp, config.n_embd, config.expert_hidden
        # GPT-2 init, like every Linear here (GPT rescales w_proj with the residual projections)
        self.w_fc = nn.Parameter(torch.randn(E, d, h) * 0.02)
        self.w_proj = nn.Parameter(torch.randn(E, h, d) * 0.02)
        self.impl = config.expert_impl

    def resolve_impl(self, x):
        if self.impl != 'auto':
            return self.impl
        bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(x.device.type)
                                             and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
        sm80 = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0)
        aligned = self.w_fc.size(1) % 8 == 0 and self.w_fc.size(2) % 8 == 0  # rows of 16 bytes in bf16
        return 'grouped' if grouped_mm is not None and bf16 and sm80 and aligned else 'loop'

    def forward(self, x, counts):
        if self.resolve_impl(x) == 'grouped':
            return self.forward_grouped(x, counts)
        w_fc, w_proj = self.w_fc, self.w_proj
        if torch.is_autocast_enabled(x.device.type):
            # ExpertLoop's matmuls write into preallocated outputs, which autocast skips: cast here
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_fc, w_proj = x.to(dtype), w_fc.to(dtype), w_proj.to(dtype)
        return ExpertLoop.apply(x, w_fc, w_proj, counts)

    def forward_grouped(self, x, counts):
        if grouped_mm is None:
            raise RuntimeError(f"expert_impl='grouped' needs torch.nn.functional.grouped_mm "
                               f"(torch {torch.__version__} has none); use expert_impl='loop'")
        E, P = counts.numel(), x.size(0)
        # pad every group to a multiple of GROUP_ALIGN rows, all on the device (no host sync):
        # row r of expert e moves from start[e] + i to padded_start[e] + i; padding rows are zero
        padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        padded_end = torch.cumsum(padded, 0)
        shift = (padded_end - padded) - (torch.cumsum(counts, 0) - counts)  # padded_start - start
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=P)
        dest = torch.arange(P, device=x.device) + shift[expert_of_row]
        x_pad = x.new_zeros(P + E * GROUP_ALIGN, x.size(1), dtype=torch.bfloat16).index_copy(0, dest, x.bfloat16())
        offs = padded_end.to(torch.int32)
        act = F.gelu(grouped_mm(x_pad, self.w_fc.bfloat16(), offs=offs))
        y = grouped_mm(act, self.w_proj.bfloat16(), offs=offs)
        if y.requires_grad:
            # the grouped GEMM's backward rejects a broadcast gradient (e.g. from y.sum())
            y.register_hook(lambda grad: grad.contiguous())
        return y[dest]


class MoE(nn.Module):
    """Router + sort-based dispatch + experts + combine (+ optional shared experts)."""

    def __init__(self, config):
        super().__init__()
        self.n_exp = config.n_exp
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.router = build_router(config)
        self.ortho_loss_coef = config.ortho_loss_coef
        self.ortho_loss_eps = config.ortho_loss_eps
        self.experts = Experts(config)
        # DeepSeekMoE (arXiv 2401.06066) shared experts: always on, so they learn what every
        # token needs and the routed experts can specialise. n shared experts of width h
        # are one MLP of width n*h.
        self.shared = MLP(config, config.n_shared_exp * config.expert_hidden) if config.n_shared_exp > 0 else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, token_ids=None):
        B, T, C = x.size()
        h = x.reshape(B * T, C)
        routing = self.router(h, None if token_ids is None else token_ids.reshape(-1), seq_len=T)

        # capacity (Switch sec. 2.2): assignments past an expert's capacity are dropped;
        # the token then keeps only its residual. None = dropless.
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor is not None and getattr(self.router, 'token_choice', True):
            capacity = expert_capacity(B * T, self.n_exp, self.top_k, capacity_factor)
            keep = capacity_keep_mask(routing.expert_idx, self.n_exp, capacity)
            routing.token_idx = routing.token_idx[keep]
            routing.expert_idx = routing.expert_idx[keep]
            routing.weight = routing.weight[keep]

        # dispatch: sort the pairs by expert so each expert reads one contiguous block
        order = torch.argsort(routing.expert_idx, stable=True)
        token_sorted = routing.token_idx[order]
        counts = expert_counts(routing.expert_idx, self.n_exp)
        expert_out = self.experts(h[token_sorted], counts)
        if self.ortho_loss_coef > 0:
            routing.losses['ortho'] = self.ortho_loss_coef * self.selected_experts_ortho_loss(expert_out, order, B * T)

        # combine: y[token] += weight * expert(token)
        weighted = expert_out * routing.weight[order].unsqueeze(1).to(expert_out.dtype)
        y = torch.zeros(B * T, C, device=x.device, dtype=weighted.dtype).index_add_(0, token_sorted, weighted)
        if self.shared is not None:
            y = y + self.shared(h)
        return self.dropout(y.to(x.dtype)).view(B, T, C), routing

    def selected_experts_ortho_loss(self, expert_out, order, n_tokens):
        """Guo et al.'s L_o (routers.ortho_loss) needs the k raw outputs of each token side
        by side. Undo the sort by expert (the argsort of a permutation is its inverse) to get
        back the router's choice-major pair order p = c*N + t, then [k, N, d] -> [N, k, d].
        GPTConfig allows this only for fixed-k token choice without drops, where P = N*k."""
        pair_out = expert_out[torch.argsort(order)]
        return ortho_loss(pair_out.view(self.top_k, n_tokens, -1).transpose(0, 1), self.ortho_loss_eps)


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn = MoE(config) if self.is_moe else MLP(config)

    def forward(self, x, token_ids=None):
        x = x + self.attn(self.ln_1(x))
        routing = None
        if self.is_moe:
            y, routing = self.ffn(self.ln_2(x), token_ids)
        else:
            y = self.ffn(self.ln_2(x))
        return x + y, routing


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms (GPT-2 has them; a bit better and faster without)
    # Mixture of Experts
    n_exp: int = 8  # experts per MoE layer; 0 or 1 = a dense MLP everywhere
    top_k: int = 2  # experts per token (token-choice routers)
    moe_every: int = 1  # 1 = every layer is MoE; 2 = layers 1, 3, 5, ... (every other, as in GShard/Switch)
    expert_hidden: int = 0  # per-expert hidden width; 0 = 4*n_embd/(top_k+n_shared_exp), equal active FFN compute to the dense MLP
    n_shared_exp: int = 0  # always-on shared experts (DeepSeekMoE)
    capacity_factor: Optional[float] = None  # None = dropless; else assignments past capacity are dropped
    eval_capacity_factor: Optional[float] = None  # None = same as capacity_factor
    expert_impl: str = 'auto'  # 'loop' (a matmul per expert), 'grouped' (one bf16 grouped GEMM); 'auto': see Experts
    # router (routers.py)
    # (a router may fix some of these, e.g. switch and hash are top-1, and fill in the None
    # ones with its paper's defaults: see fixed_config / default_config in routers.py)
    router: str = 'topk'  # a name in routers.ROUTERS
    renormalize: bool = True  # top-k weights divided by their sum (Mixtral) or not (OLMoE)
    aux_loss_coef: float = 0.01  # Switch balance loss, Fedus et al. 2021 sec. 2.2
    z_loss_coef: float = 0.001  # router z-loss, Zoph et al. 2022 (ST-MoE) sec. 3.1
    # Guo et al. 2025 (arXiv 2505.22323); None = 0, or the ortho_var preset's defaults
    ortho_loss_coef: Optional[float] = None  # beta: orthogonality of the selected experts' outputs (fixed-k, dropless)
    ortho_loss_eps: float = 1e-6  # epsilon in L_o's projection denominator
    var_loss_coef: Optional[float] = None  # gamma: variance of each token's routing softmax, maximised
    # GatePro (Zheng et al. 2025, arXiv 2510.13079)
    gatepro_penalty: float = 1e4  # lambda subtracted from a losing expert's logit; 1e-4 is the paper's literal value
    gatepro_start_iter: int = 0  # competition on from this iteration...
    gatepro_end_iter: Optional[int] = None  # ...until this one (excluded); None = to the end
    # Switch (Fedus et al. 2021)
    switch_jitter: float = 0.01  # multiplicative router-input noise U[1-eps, 1+eps], training only; 0 = off
    # DeepSeek-V3 auxiliary-loss-free balancing (arXiv 2412.19437 sec. 2.1.2)
    aux_free_update_rate: float = 0.001  # gamma: bias step per optimizer step (DeepSeek-V3 sec. 4.2)
    aux_free_seq_loss_coef: float = 1e-4  # alpha of the sequence-wise balance loss (sec. 4.2); 0 = off
    aux_free_scale: float = 1.0  # gate weights multiplier (DeepSeek-V3's released config: 2.5)
    # hash layers (Roller et al. 2021)
    hash_seed: int = 0  # seed of the fixed random token-id -> expert map

    def __post_init__(self):
        # every problem here is a user's setting: say which, and what would work
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be >= 1")
        if self.expert_impl not in ('auto', 'loop', 'grouped'):
            raise ValueError(f"expert_impl={self.expert_impl!r} must be 'auto', 'loop' or 'grouped'")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; available: {', '.join(sorted(ROUTERS))}")
        # what the router cannot do without (switch, hash: top_k=1), then its paper's defaults
        # for what the user left None (switch: capacity 1.25 / 2.0), then the global ones
        router_class = ROUTERS[self.router]
        for name, value in router_class.fixed_config.items():
            setattr(self, name, value)
        for name, value in router_class.default_config.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ('ortho_loss_coef', 'var_loss_coef'):
            if getattr(self, name) is None:
                setattr(self, name, 0.0)
        if self.n_exp > 1:
            if not 1 <= self.top_k <= self.n_exp:
                raise ValueError(f"top_k={self.top_k} must be between 1 and n_exp={self.n_exp}")
            for name in ('capacity_factor', 'eval_capacity_factor'):
                value = getattr(self, name)
                if value is not None and value <= 0:
                    raise ValueError(f"{name}={value} must be > 0, or None for dropless routing")
            if self.eval_capacity_factor is None:
                self.eval_capacity_factor = self.capacity_factor
            if self.expert_hidden <= 0:
                self.expert_hidden = max(1, 4 * self.n_embd // (self.top_k + self.n_shared_exp))
            if self.ortho_loss_coef > 0:
                self.check_ortho_loss(router_class)

    def check_ortho_loss(self, router_class):
        # L_o pairs the top_k outputs of each token (MoE.selected_experts_ortho_loss): every
        # token must have exactly top_k >= 2 experts, none dropped
        problem = None
        if not router_class.token_choice or router_class.variable_k:
            problem = f"router {self.router!r} does not give every token exactly top_k experts"
        elif self.top_k < 2:
            problem = f"top_k={self.top_k}: a token with one expert has no pair (router {self.router!r})"
        elif self.capacity_factor is not None or self.eval_capacity_factor is not None:
            problem = (f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}: "
                       f"a dropped assignment leaves its token fewer than top_k outputs; use None (dropless)")
        if problem:
            raise ValueError(f"ortho_loss_coef={self.ortho_loss_coef} needs fixed-k token choice without drops: {problem}")

    @property
    def use_moe(self):
        return self.n_exp > 1

    def is_moe_layer(self, layer_idx):
        return self.use_moe and layer_idx % self.moe_every == self.moe_every - 1


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the input embedding is the output projection
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2*n_layer), since each layer adds two
        # residual branches whose variance accumulates
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') or name.endswith('experts.w_proj'):
                torch.nn.init.normal_(p, mean=0.0, std=proj_std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def moe_layers(self):
        """(layer index, MoE module) for every MoE layer."""
        return [(i, block.ffn) for i, block in enumerate(self.transformer.h) if block.is_moe]

    def get_num_params(self, non_embedding=True):
        """Parameter count; position embeddings excluded by default (token embeddings stay:
        they are tied to the lm_head, which does real matmul work)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def get_num_active_params(self, non_embedding=True):
        """Parameters a token actually uses: each MoE layer's experts count for
        experts_per_token/E of their size (k/E for token choice)."""
        n_params = self.get_num_params(non_embedding)
        for _, moe in self.moe_layers():
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            per_token = getattr(moe.router, 'experts_per_token', moe.top_k)
            n_params -= expert_params * (1 - per_token / moe.n_exp)
        return int(n_params)

    def forward(self, idx, targets=None):
        """Returns (logits, loss, routings). routings maps MoE layer index -> Routing.
        loss = cross-entropy + the sum of every router's (already scaled) losses."""
        device = idx.device
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size={self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        routings = {}
        for i, block in enumerate(self.transformer.h):
            x, routing = block(x, idx)
            if routing is not None:
                routings[i] = routing
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            for routing in routings.values():
                for value in routing.losses.values():
                    loss = loss + value
        else:
            # inference: only the last position's logits are needed
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss, routings

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on matrices (Linear, embeddings, stacked experts), none on 1-D
        # parameters (biases, LayerNorm gains)
        params = [p for p in self.parameters() if p.requires_grad]
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0},
        ]
        # fused AdamW: one kernel over all parameters instead of a chain of foreach ops that
        # each write a temporary as large as the parameters (3-6x faster on CPU at E=64)
        if 'fused' in inspect.signature(torch.optim.AdamW).parameters:
            try:
                return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=True)
            except RuntimeError:
                pass  # this torch has no fused AdamW for this device
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation against peak_flops (default: A100 bf16, 312 TFLOPS).
        PaLM appendix B: 6*N flops per token for the weights plus 12*L*H*Q*T for attention,
        with N the ACTIVE parameters: an MoE token only touches its k experts."""
        N = self.get_num_active_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, return_experts=False):
        """Sample max_new_tokens tokens after idx [B, T]. With return_experts=True also
        return, for each generated position, the top-1 expert of every MoE layer that
        processed the token that was fed in at that step: a list of {layer: [B] experts}
        (the expert with the largest gate weight; -1 if the token got none)."""
        experts = []
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _, routings = self(idx_cond)
            if return_experts:
                B, T = idx_cond.shape
                experts.append({layer: r.top_expert(B * T).view(B, T)[:, -1] for layer, r in routings.items()})
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return (idx, experts) if return_experts else idx


def keep_freed_memory_on_cpu():
    """Make glibc keep large freed blocks for reuse instead of returning them to the OS.

    By default glibc hands every block of 32 MiB or more back to the OS when it is freed,
    so the next allocation of that size page-faults in fresh zeroed memory: ~26 ms for
    32 MiB here, against ~1 ms to reuse a block. The stacked expert weights at E=64
    ([64, 256, 512] fp32) are exactly 32 MiB, so every step's eight expert gradients paid
    this: 140-220 ms of a ~1 s forward+backward with bench.py's shapes on one thread.
    Process-wide, Linux/glibc only (a no-op elsewhere); train.py and bench.py call it for
    CPU runs. Freed memory then stays in the process for reuse."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
