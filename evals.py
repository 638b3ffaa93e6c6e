"""
What an eval measures beyond the language-model loss, for train.py: whether the model's
answers are right (exact match on the questions of the 'domains' dataset), and how it does
on another dataset (eval_also: a second val split, per domain, and on the domains the run
does not train on, which shows what fine-tuning made it forget).

ExtraEvals      set up from the dataset and the config, run at each eval, described in a
                line each for the console; its results go into metrics.jsonl
answer_prompts  val prompts whose right answer is known
exact_match     the share of right answers
loss_by_domain  the mean loss per domain, and over the domains not trained on
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from dataset import DATA_ROOT, check_tokens, load_meta, read_batch


class ExtraEvals:
    """eval_answers: val questions per checkable domain (meta['answers'] names each domain's
    marker, e.g. arithmetic '=' in '37+85=122'), answered greedily; 0 = off. eval_also: a
    dataset (a folder of data/, or a path) with the same vocabulary whose val split each
    eval measures too; '' = off. Raises ValueError (one line) for an eval_also that does
    not fit. verbose: print what cannot be measured (rank 0 only)."""

    def __init__(self, data, eval_answers, eval_also, block_size, batch_size, eval_iters, device, ctx, verbose=True):
        self.data, self.block_size, self.batch_size, self.eval_iters = data, block_size, batch_size, eval_iters
        self.device, self.ctx = device, ctx
        meta = data.meta
        # a task metric where the dataset has checkable answers: a fixed set of val prompts per
        # domain, so every eval asks the same questions
        self.answer_sets = {}
        if meta and meta.get('answers') and data.label_names is not None and data.class_of_token is None \
                and eval_answers > 0:
            val_tokens = torch.from_numpy(np.fromfile(data.path('val'), dtype=np.uint16).astype(np.int64))
            val_domains = torch.from_numpy(np.fromfile(data.path('val', '_domain'), dtype=np.uint8))
            for name, marker in meta['answers'].items():
                prompts, answers = answer_prompts(val_tokens, val_domains, data.label_names.index(name),
                                                  [meta['stoi'][ch] for ch in marker], meta['stoi']['\n'],
                                                  eval_answers, max(1, block_size // 2))
                if answers:
                    self.answer_sets[name] = (prompts, answers)
        elif meta and 'domains' in meta and 'answers' not in meta and eval_answers > 0 and verbose:
            print(f"{os.path.join(data.dir, 'meta.pkl')} names no checkable answers (written before they were): run "
                  f"data/domains/prepare.py again for the exact-match answer accuracy")

        # eval_also: a second val split with the same vocabulary; where it has domain labels,
        # its loss per domain, and on the domains this run does not train on
        self.eval_also, self.also_dir, self.also_domains, self.trained_domains = eval_also, None, None, None
        if not eval_also:
            return
        self.also_dir = eval_also if os.path.isdir(eval_also) else os.path.join(DATA_ROOT, eval_also)
        if not os.path.exists(os.path.join(self.also_dir, 'val.bin')):
            raise ValueError(f"eval_also={eval_also!r}: {os.path.join(self.also_dir, 'val.bin')} is missing; "
                             f"prepare that dataset first")
        try:
            also_meta = load_meta(self.also_dir)
            if also_meta and meta and also_meta['vocab_size'] != data.vocab_size:
                raise ValueError(f"it has vocab_size={also_meta['vocab_size']} but dataset {data.name!r} has "
                                 f"{data.vocab_size}; evaluate on a dataset with the same vocabulary")
            check_tokens(os.path.join(self.also_dir, 'val.bin'), data.vocab_size, data.vocab_source)
        except ValueError as e:
            raise ValueError(f"eval_also={eval_also!r}: {e}") from None
        if also_meta and 'domains' in also_meta and os.path.exists(os.path.join(self.also_dir, 'val_domain.bin')):
            self.also_domains = list(also_meta['domains'])
            # the domains this run trains on: a narrow dataset names them (prepare.py --only)
            self.trained_domains = list(meta.get('only') or self.also_domains) if meta else self.also_domains

    def run(self, model, raw_model, generator):
        """The fields an eval line of metrics.jsonl gets: 'answer_accuracy' ({} when off), and
        'eval_also' when on. model: what trains (compiled, or under DDP); raw_model: the plain
        GPT, for generation; generator: the eval batches' (train.py seeds it per eval)."""
        out = {'answer_accuracy': self.answer_accuracy(raw_model)}
        if self.also_dir:
            out['eval_also'] = self.also_loss(model, generator)
        return out

    def describe(self, results):
        """The console lines for run()'s results."""
        lines = []
        if results['answer_accuracy']:
            lines.append("exact-match answers (greedy, val): " + ', '.join(
                f"{name} {value:.1%} of {len(self.answer_sets[name][1])}"
                for name, value in results['answer_accuracy'].items()))
        also = results.get('eval_also')
        if also:
            lines.append(f"val loss on {self.eval_also}: {also['loss']:.4f}" + (', by domain: ' + ', '.join(
                f"{name} {value:.4f}" for name, value in also['domain_loss'].items()) if 'domain_loss' in also else ''))
        return lines

    @torch.no_grad()
    def answer_accuracy(self, raw_model):
        """{domain: exact-match accuracy} of the greedy answers to answer_sets' prompts, decoded
        in one batch per domain (on the uncompiled model: every step has another length)."""
        accuracy = {}
        raw_model.eval()
        for name, (prompts, answers) in self.answer_sets.items():
            with self.ctx:  # top_tokens=1: the most likely token at every step, greedy decoding
                out = raw_model.generate(prompts.to(self.device), max(map(len, answers)) + 1, top_tokens=1)
            accuracy[name] = exact_match(out[:, prompts.size(1):].tolist(), answers, self.data.meta['stoi']['\n'])
        raw_model.train()
        return accuracy

    @torch.no_grad()
    def also_loss(self, model, generator):
        """eval_also's val split, eval_iters batches: the mean cross-entropy and, where it has
        domain labels, the mean per domain (of the token predicted) and over the domains this
        run does not train on (loss_by_domain)."""
        block_size = self.block_size
        data = np.memmap(os.path.join(self.also_dir, 'val.bin'), dtype=np.uint16, mode='r')
        labels = (np.memmap(os.path.join(self.also_dir, 'val_domain.bin'), dtype=np.uint8, mode='r')
                  if self.also_domains else None)
        loss_batches, label_batches = [], []
        model.eval()
        for _ in range(self.eval_iters):
            ix = torch.randint(len(data) - block_size, (self.batch_size,), generator=generator)
            x, y = (t.to(self.device) for t in read_batch(data, ix, block_size))
            with self.ctx:
                logits = model(x, y)[0]
            loss_batches.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction='none'))
            if labels is not None:  # the domain of each predicted token: y's positions
                label_batches.append(read_batch(labels, ix, block_size)[1].view(-1))
        model.train()
        token_loss = torch.cat(loss_batches).cpu()  # one read-back for the whole evaluation
        if labels is None:
            return {'dataset': self.eval_also, 'loss': token_loss.double().mean().item()}
        return {'dataset': self.eval_also,
                **loss_by_domain(token_loss, torch.cat(label_batches), self.also_domains, self.trained_domains)}


# -----------------------------------------------------------------------------
# Task accuracy: whether the model's answer is right, not only how likely the text is


def loss_by_domain(token_loss, labels, names, trained):
    """What a model forgets when it is fine-tuned on some domains: token_loss [n] (the
    cross-entropy of each predicted token), labels [n] (its domain, an index into names).
    Returns {'loss': mean over all tokens, 'domain_loss': {name: mean over that domain's
    tokens} for the domains present, and 'other_domains_loss': mean over the tokens of the
    domains not in trained}, the last only when there are such tokens."""
    token_loss, labels = token_loss.double(), labels.long()
    loss_sum = torch.zeros(len(names), dtype=torch.float64).index_add_(0, labels, token_loss)
    count = torch.bincount(labels, minlength=len(names)).double()
    out = {'loss': token_loss.mean().item(),
           'domain_loss': {name: (loss_sum[i] / count[i]).item() for i, name in enumerate(names) if count[i]}}
    other = torch.tensor([name not in trained for name in names])
    if count[other].sum() > 0:
        out['other_domains_loss'] = (loss_sum[other].sum() / count[other].sum()).item()
    return out


def answer_prompts(tokens, domain_ids, domain, marker, newline, n, context):
    """Prompts whose right answer is known, from a labelled token stream (data/domains:
    arithmetic '37+85=' -> '122'). A match is a place where the token ids `marker` occur in
    a document of domain `domain`; its answer is every token after the marker up to the
    next `newline` (the datasets' answers never contain their marker), and its prompt the
    `context` tokens that end with the marker. n matches, spread evenly over the stream,
    so every evaluation asks the same questions.
    tokens, domain_ids: 1-D integer tensors of equal length; marker: a list of token ids.
    Returns (prompts [m, context] long tensor, answers: m lists of token ids), m <= n."""
    tokens, domain_ids = torch.as_tensor(tokens).long(), torch.as_tensor(domain_ids)
    width = len(tokens) - len(marker) + 1
    found = domain_ids[:width] == domain
    for j, token in enumerate(marker):
        found &= tokens[j:j + width] == token
    starts = torch.nonzero(found).flatten() + len(marker)  # where each answer starts
    newlines = torch.nonzero(tokens == newline).flatten()
    ends = torch.searchsorted(newlines, starts)  # index of the newline that ends each answer
    keep = (starts >= context) & (ends < len(newlines))
    starts, ends = starts[keep], newlines[ends[keep]]
    if len(starts) > n:
        pick = torch.linspace(0, len(starts) - 1, n).round().long().unique()
        starts, ends = starts[pick], ends[pick]
    prompts = torch.stack([tokens[s - context:s] for s in starts]) if len(starts) else torch.zeros(0, context).long()
    return prompts, [tokens[s:e].tolist() for s, e in zip(starts, ends)]


def exact_match(generated, answers, stop):
    """Exact-match accuracy: the fraction of the rows whose generated token ids begin with
    the answer and then `stop` (the newline), so a right answer must also end where it should.
    generated: per row the ids produced after the prompt; answers: per row the right ids."""
    right = [list(row[:len(answer) + 1]) == list(answer) + [stop] for row, answer in zip(generated, answers)]
    return sum(right) / len(right) if right else 0.0
