"""
A GPT-2 style decoder whose feed-forward blocks can be Mixtures of Experts.

Data flow of one MoE feed-forward (N = B*T tokens, k experts per token):
    h [N, d] -> router -> P (token, expert, weight) pairs      (routers.py, capacity included)
    sort pairs by expert -> each expert runs on its contiguous group of tokens
    y[token] += weight * expert_out  (index_add back to [N, d])
The model returns the language-model loss and the routers' losses separately.
Cost is O(N*k*d) memory and compute: no one-hot [N, E, capacity] dispatch tensors.

References:
1) GPT-2: https://github.com/openai/gpt-2 (architecture, init)
2) nanoGPT: https://github.com/karpathy/nanoGPT (the shape of this file)
3) Switch Transformer, arXiv 2101.03961; GShard, arXiv 2006.16668 (capacity)
4) DeepSeekMoE, arXiv 2401.06066 (shared experts)
"""

import inspect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_experts import run_experts
from routers import RouterConfig, build_router


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
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approximate)))


class Experts(nn.Module):
    """E feed-forward experts (d -> h -> d, GELU, no bias) with their weights stacked,
    w_fc [E, d, h] and w_proj [E, h, d].

    Input: the tokens already sorted by expert, x [P, d], and counts [E] (how many rows
    belong to each expert; rows past sum(counts) were dropped by capacity). Output: [P, d],
    row for row, 0 for a dropped row.

    expert_impl='plain' runs the loop below with autograd: read it to see what an MoE layer
    computes. The default 'auto' runs the same computation faster (fast_experts.py: a
    hand-written backward on CPU, one grouped GEMM on H100/H200/B200); tests check they agree."""

    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_exp, config.n_embd, config.expert_hidden
        # GPT-2 init, like every Linear here (GPT rescales w_proj with the residual projections)
        self.w_fc = nn.Parameter(torch.randn(E, d, h) * 0.02)
        self.w_proj = nn.Parameter(torch.randn(E, h, d) * 0.02)
        self.impl = config.expert_impl

    def forward(self, x, counts):
        if self.impl != 'plain':
            return run_experts(self.impl, x, self.w_fc, self.w_proj, counts)
        # one matmul pair per expert, each on its own contiguous block of rows
        sizes = counts.tolist()
        outputs = [F.gelu(rows @ self.w_fc[e]) @ self.w_proj[e] for e, rows in enumerate(x[:sum(sizes)].split(sizes))]
        dropped = outputs[0].new_zeros(x.size(0) - sum(sizes), self.w_proj.size(2))  # pairs over capacity: no expert
        return torch.cat(outputs + [dropped])


class MoE(nn.Module):
    """Router + sort-based dispatch + experts + combine (+ optional shared experts)."""

    def __init__(self, config):
        super().__init__()
        self.n_exp = config.n_exp
        self.router = build_router(config)
        self.experts = Experts(config)
        # DeepSeekMoE (arXiv 2401.06066) shared experts: always on, so they learn what every
        # token needs and the routed experts can specialise. n shared experts of width h
        # are one MLP of width n*h.
        self.shared = MLP(config, config.n_shared_exp * config.expert_hidden) if config.n_shared_exp > 0 else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, token_ids=None, keep_expert_out=False):
        """Returns (y [B, T, C], the Routing, this layer's router losses {name: scalar}).
        keep_expert_out=True: the Routing returned is a copy that also holds each pair's raw
        expert output, detached, for the metrics (routers.Routing.expert_out)."""
        B, T, C = x.size()
        h = x.reshape(B * T, C)
        routing = self.router(h, None if token_ids is None else token_ids.reshape(-1), seq_len=T)

        # dispatch: sort the pairs by expert so each expert reads one contiguous block; pairs
        # dropped by capacity, and empty slots (kept False too: routers.Routing), sort last,
        # past every group, and no expert runs on them
        expert_key = routing.expert_idx if routing.kept is None else routing.expert_idx.masked_fill(~routing.kept, self.n_exp)
        order = torch.argsort(expert_key, stable=True)
        token_sorted = routing.token_idx[order]
        counts = routing.load()
        expert_out = self.experts(h[token_sorted], counts)
        losses = {**routing.losses, **self.router.output_losses(routing, expert_out, order)}
        if keep_expert_out:
            routing = replace(routing, expert_out=expert_out.detach()[torch.argsort(order)])  # back to pair order

        # combine: y[token] += weight * expert(token)
        weighted = expert_out * routing.weight[order].unsqueeze(1).to(expert_out.dtype)
        y = torch.zeros(B * T, C, device=x.device, dtype=weighted.dtype).index_add_(0, token_sorted, weighted)
        if self.shared is not None:
            y = y + self.shared(h)
        return self.dropout(y.to(x.dtype)).view(B, T, C), routing, losses


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn = MoE(config) if self.is_moe else MLP(config)

    def forward(self, x, token_ids=None, keep_expert_out=False):
        """Returns (x, routing, router losses); routing is None and losses {} in a dense block."""
        x = x + self.attn(self.ln_1(x))
        if not self.is_moe:
            return x + self.ffn(self.ln_2(x)), None, {}
        y, routing, losses = self.ffn(self.ln_2(x), token_ids, keep_expert_out)
        return x + y, routing, losses


@dataclass
class GPTConfig(RouterConfig):
    """The model's shape. It inherits every routing setting from routers.RouterConfig (router,
    n_exp, top_k, capacity, loss coefficients, ...), so all of them are flat config keys."""
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms (GPT-2 has them; a bit better and faster without)
    # Mixture of Experts (the number of experts, n_exp, is a RouterConfig field)
    moe_every: int = 1  # 1 = every layer is MoE; 2 = layers 1, 3, 5, ... (every other, as in GShard/Switch)
    expert_hidden: int = 0  # per-expert hidden width; 0 = 4*n_embd/(experts per token + n_shared_exp), the dense MLP's active compute
    n_shared_exp: int = 0  # always-on shared experts (DeepSeekMoE)
    expert_impl: str = 'auto'  # 'plain' (the readable loop in Experts), or fast_experts.py's 'loop', 'grouped', 'auto'
    gelu_approximate: str = 'none'  # the dense MLP's GELU: 'none' = exact, 'tanh' = GPT-2's approximation (its weights)

    def __post_init__(self):
        # every problem here is a user's setting: say which, and what would work
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be >= 1")
        if self.expert_impl not in ('auto', 'plain', 'loop', 'grouped'):
            raise ValueError(f"expert_impl={self.expert_impl!r} must be 'auto', 'plain', 'loop' or 'grouped'")
        if self.gelu_approximate not in ('none', 'tanh'):
            raise ValueError(f"gelu_approximate={self.gelu_approximate!r} must be 'none' (exact) or 'tanh'")
        if self.gelu_approximate == 'tanh' and self.n_exp > 1:
            raise ValueError("gelu_approximate='tanh' is for dense MLPs (GPT-2's weights): the experts compute the "
                             "exact GELU; use gelu_approximate='none' with n_exp > 1")
        super().__post_init__()  # the router's settings: what it fixes, its defaults, their checks
        if self.use_moe and self.expert_hidden <= 0:
            self.expert_hidden = max(1, int(4 * self.n_embd / (self.experts_per_token + self.n_shared_exp)))

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

    def get_num_active_params(self, non_embedding=True, experts_per_token=None):
        """Parameters a token actually uses: each MoE layer's experts count for
        experts_per_token/E of their size. experts_per_token: None = what the model is sized
        for (the config's: top_k for token choice, so at top_k for topp, remoe and null
        experts too); a number for every MoE layer, or {layer: number}, e.g. the mean number
        of experts that ran per token in a step (metrics' experts_per_token)."""
        n_params = self.get_num_params(non_embedding)
        for layer, moe in self.moe_layers():
            if experts_per_token is None:
                k = self.config.experts_per_token
            else:
                k = experts_per_token[layer] if isinstance(experts_per_token, dict) else experts_per_token
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            n_params -= expert_params * (1 - k / moe.n_exp)
        return int(n_params)

    def step_finished(self, iter_num, load_counts):
        """After the optimizer step of iteration iter_num: tell every router, with its layer's
        assignment counts over the global batch (load_counts: {layer: [E]}). A router that
        sees every layer (ReMoE, whose sparsity target is the whole model's) gets the mean of
        the MoE layers' counts instead, the same in every layer. Then the next global batch
        begins (balance_scope='global' counts it afresh)."""
        layers = self.moe_layers()
        if any(moe.router.sees_every_layer for _, moe in layers):
            mean_counts = torch.stack([load_counts[layer].float() for layer, _ in layers]).mean(dim=0)
        for layer, moe in layers:
            moe.router.step_finished(iter_num, mean_counts if moe.router.sees_every_layer else load_counts[layer])
            moe.router.start_global_batch()

    def forward(self, idx, targets=None, keep_expert_out=False):
        """Returns (logits, lm_loss, router_losses, routings):
        lm_loss: the cross-entropy (None without targets); router_losses: {name: scalar},
        each router loss (already scaled by its coefficient) summed over the MoE layers;
        routings: MoE layer index -> Routing. Train on lm_loss + sum(router_losses.values()).
        keep_expert_out=True: each Routing also holds its pairs' expert outputs (metrics)."""
        device = idx.device
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size={self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        routings, router_losses = {}, {}
        for i, block in enumerate(self.transformer.h):
            x, routing, losses = block(x, idx, keep_expert_out)
            if routing is not None:
                routings[i] = routing
            for name, value in losses.items():
                router_losses[name] = router_losses.get(name, 0.0) + value
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference: only the last position's logits are needed
            logits = self.lm_head(x[:, [-1], :])
            lm_loss = None
        return logits, lm_loss, router_losses, routings

    def configure_optimizers(self, weight_decay, learning_rate, betas):
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

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12, experts_per_token=None):
        """Model FLOPs utilisation against peak_flops (default: A100 bf16, 312 TFLOPS; train.py
        passes the GPU's own, system.peak_flops).
        PaLM appendix B: 6*N flops per token for the weights plus 12*L*H*Q*T for attention,
        with N the ACTIVE parameters: an MoE token only touches the experts that ran for it.
        experts_per_token (as in get_num_active_params): train.py passes each layer's mean
        over the step, so a token that took 1 expert or 5 (topp, remoe, null experts), or
        lost one to capacity, counts what it computed; None counts top_k."""
        N = self.get_num_active_params(experts_per_token=experts_per_token)
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_tokens=None, return_experts=False,
                 return_expert_counts=False):
        """Sample max_new_tokens tokens after idx [B, T], each among the top_tokens most likely
        ones (None = all; 1 = greedy, the most likely). With return_experts=True also
        return, for each generated position, the top-1 expert of every MoE layer that
        processed the token that was fed in at that step: a list of {layer: [B] experts}
        (the expert with the largest gate weight; -1 if the token got none). With
        return_expert_counts=True also (after those) the number of experts that ran for
        that token in every MoE layer, in the same form: it varies under topp, remoe and
        null experts. Returns idx alone when neither is asked for, else a tuple."""
        experts, counts = [], []
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _, _, routings = self(idx_cond)
            B, T = idx_cond.shape
            if return_experts:
                experts.append({layer: r.top_expert(B * T).view(B, T)[:, -1] for layer, r in routings.items()})
            if return_expert_counts:
                counts.append({layer: r.experts_per_token(B * T).view(B, T)[:, -1] for layer, r in routings.items()})
            logits = logits[:, -1, :] / temperature
            if top_tokens == 1:  # greedy: no sampling (and no error from a model whose logits are NaN)
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                if top_tokens is not None:
                    v, _ = torch.topk(logits, min(top_tokens, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        asked = ([experts] if return_experts else []) + ([counts] if return_expert_counts else [])
        return (idx, *asked) if asked else idx


# -----------------------------------------------------------------------------
# Starting from trained weights: sparse upcycling, GPT-2 (train.py's init_from)


def upcycle_state_dict(dense_state, config, noise=0.0, drop_ratio=0.0, generator=None):
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): the state dict
    of a dense model, turned into one for the MoE model described by config (a GPTConfig
    with n_exp > 1). In every MoE layer each of the E experts starts as a copy of that
    layer's MLP (so expert_hidden must be the MLP's width); everything else is copied as is.
    The routers are not in the result: the model keeps its fresh, random gates.

    With identical experts the layer computes sum_k w_k MLP(x) = MLP(x) whenever each
    token's weights sum to 1 and no assignment is dropped (top-k with renormalize=True,
    no capacity_factor): at its first step the upcycled model is the dense one.
    noise > 0 adds to each copy Gaussian noise of std noise * std(W), W the copied matrix,
    so the experts are not exactly alike. drop_ratio > 0 is Drop-Upcycling's "diversity
    re-initialization" (Nakamura et al. 2025, arXiv 2502.19261, sec. 3): in each expert a
    random drop_ratio of the hidden units (columns of W_fc, the same rows of W_proj) is
    re-initialised from N(mean(W), std(W)^2) of the matrix it belongs to; the paper's
    choice is 0.5. Either one makes the first step differ from the dense model. The MLP must have no biases (the experts have
    none): upcycling a bias=True model is a ValueError."""
    if config.bias:
        raise ValueError("upcycling a model with biases (bias=True, e.g. GPT-2) would need biases in the experts, "
                         "which have none; upcycle a bias=False model, or fine-tune this one dense (n_exp=1)")
    if config.n_shared_exp:
        raise ValueError(f"n_shared_exp={config.n_shared_exp}: upcycling copies the MLP into every routed expert, "
                         f"and a shared expert would add it a second time; use n_shared_exp=0")
    state = dict(dense_state)
    for layer in range(config.n_layer):
        if not config.is_moe_layer(layer):
            continue
        prefix = f'transformer.h.{layer}.ffn.'
        w_fc = state.pop(prefix + 'c_fc.weight').t()  # nn.Linear stores [h, d]; the experts [d, h]
        w_proj = state.pop(prefix + 'c_proj.weight').t()
        if w_fc.size(1) != config.expert_hidden:
            raise ValueError(f"upcycling copies layer {layer}'s MLP of width {w_fc.size(1)} into each expert: "
                             f"expert_hidden must be {w_fc.size(1)}, got expert_hidden={config.expert_hidden}")
        experts_fc = w_fc.unsqueeze(0).repeat(config.n_exp, 1, 1)
        experts_proj = w_proj.unsqueeze(0).repeat(config.n_exp, 1, 1)
        if noise > 0:
            experts_fc += noise * w_fc.std() * torch.randn(experts_fc.shape, generator=generator).to(w_fc)
            experts_proj += noise * w_proj.std() * torch.randn(experts_proj.shape, generator=generator).to(w_proj)
        if drop_ratio > 0:
            hidden = w_fc.size(1)
            for e in range(config.n_exp):
                units = torch.randperm(hidden, generator=generator)[:int(drop_ratio * hidden)].to(w_fc.device)
                fresh_fc = torch.randn(w_fc.size(0), len(units), generator=generator).to(w_fc)
                fresh_proj = torch.randn(len(units), w_proj.size(1), generator=generator).to(w_proj)
                experts_fc[e][:, units] = w_fc.mean() + w_fc.std() * fresh_fc
                experts_proj[e][units] = w_proj.mean() + w_proj.std() * fresh_proj
        state[prefix + 'experts.w_fc'] = experts_fc
        state[prefix + 'experts.w_proj'] = experts_proj
    return state


GPT2_GELU = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'none'}  # transformers' names -> F.gelu's


def gpt2_state_dict(hf_config, hf_state):
    """(model_args, state_dict) of this GPT for the weights of a Hugging Face GPT-2
    (transformers' GPT2LMHeadModel or GPT2Model): hf_config is its config.json as a dict,
    hf_state its tensors by name. The architectures are the same (pre-LayerNorm blocks,
    learned positions, tied embeddings, biases); GPT-2's Conv1D layers store their weights
    as [in, out], transposed against nn.Linear, and its MLP is called mlp here ffn.
    The MLP's GELU is the tanh approximation GPT-2 was trained with ("gelu_new"), so the
    logits are GPT-2's. A GPT-2 variant this model cannot compute is a ValueError."""
    get = hf_config.get
    n_embd = get('n_embd')
    problems = [
        (get('model_type') != 'gpt2', f"model_type={get('model_type')!r}, not 'gpt2'"),
        (get('activation_function') not in GPT2_GELU, f"activation_function={get('activation_function')!r}"),
        (get('n_inner') not in (None, 4 * (n_embd or 0)), f"n_inner={get('n_inner')} (the MLP here is 4*n_embd)"),
        (get('layer_norm_epsilon', 1e-5) != 1e-5, f"layer_norm_epsilon={get('layer_norm_epsilon')} (here 1e-5)"),
        (not get('scale_attn_weights', True), "scale_attn_weights=False"),
        (get('scale_attn_by_inverse_layer_idx', False), "scale_attn_by_inverse_layer_idx=True"),
        (not get('tie_word_embeddings', True), "tie_word_embeddings=False (here the lm_head is the embedding)"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"this GPT-2 cannot be loaded: {what}")
    model_args = dict(n_layer=get('n_layer'), n_head=get('n_head'), n_embd=n_embd, block_size=get('n_positions'),
                      vocab_size=get('vocab_size'), bias=True, n_exp=1,
                      gelu_approximate=GPT2_GELU[get('activation_function')])
    conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    state = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix('transformer.')  # GPT2Model's files have no prefix, GPT2LMHeadModel's have it
        if name.endswith(('.attn.bias', '.attn.masked_bias')) or name == 'lm_head.weight':
            continue  # the causal mask (a buffer in old files), and the lm_head, tied to wte
        if name.endswith(conv1d):
            tensor = tensor.t()
        state['transformer.' + name.replace('.mlp.', '.ffn.')] = tensor
    state['lm_head.weight'] = state['transformer.wte.weight']
    return model_args, state
