"""A GRPO-style policy loss on per-token log-probabilities that never materialise the logits.

GRPO (Shao et al. 2024, DeepSeekMath) samples G completions per prompt, scores them, and uses the
group-normalised reward as every token's advantage A. With per-token log-probs of the policy
(``logp``), of the sampling policy (``logp_old``) and of a frozen reference (``logp_ref``):

    ratio = exp(logp - logp_old)
    loss  = -mean_t min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_t
    KL_t  = exp(logp_ref - logp) - (logp_ref - logp) - 1          (the k3 estimator)

All three come from ``fastllm.ops.linear_log_probs(hidden, lm_head.weight, tokens)``, so the
``[tokens, vocab]`` logits of policy and reference are never held. Runs on the CPU in seconds:

    python examples/grpo_logprobs.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastllm.ops.chunked_linear_loss import linear_log_probs


def token_log_probs(model: LlamaForCausalLM, seqs: torch.Tensor, temperature: float = 1.0):
    """log p(seqs[:, t+1] | seqs[:, :t+1]) for t < T-1 -> ``[B, T-1]``, plus the per-token entropy."""
    hidden = model.model(input_ids=seqs).last_hidden_state[:, :-1]  # (B, T-1, H)
    return linear_log_probs(hidden, model.lm_head.weight, seqs[:, 1:], temperature=temperature,
                            chunk_size=64, return_entropy=True)


def grpo_loss(logp, logp_old, logp_ref, advantages, mask, *, clip_eps=0.2, beta=0.04):
    """GRPO objective averaged over completion tokens (``mask`` 1 there, 0 on the prompt)."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]  # (B, 1): one advantage per completion
    policy = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    return ((policy + beta * kl) * mask).sum() / mask.sum()


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    policy = LlamaForCausalLM(cfg)
    reference = LlamaForCausalLM(cfg).eval()
    reference.load_state_dict(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    groups, group_size, prompt_len, new_tokens = 2, 4, 8, 12
    prompts = torch.randint(0, cfg.vocab_size, (groups, prompt_len)).repeat_interleave(group_size, 0)
    with torch.no_grad():
        seqs = policy.generate(prompts, max_new_tokens=new_tokens, do_sample=True, top_k=0,
                               attention_mask=torch.ones_like(prompts))
    mask = torch.zeros(seqs.shape[0], seqs.shape[1] - 1)
    mask[:, prompt_len - 1:] = 1.0  # targets that are completion tokens
    # A toy reward: how many even token ids a completion holds; normalised within each group.
    reward = (seqs[:, prompt_len:] % 2 == 0).float().sum(1).view(groups, group_size)
    advantages = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)).view(-1)

    with torch.no_grad():
        logp_old, _ = token_log_probs(policy, seqs)
        logp_ref, _ = token_log_probs(reference, seqs)
    for step in range(4):
        logp, entropy = token_log_probs(policy, seqs)
        loss = grpo_loss(logp, logp_old, logp_ref, advantages, mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ent = float((entropy.detach() * mask).sum() / mask.sum())
        print(f"step {step}: loss {loss.item():+.4f}  mean entropy {ent:.3f}")


if __name__ == "__main__":
    main()
