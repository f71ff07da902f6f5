"""The last step of both plain loss references (continuous and discrete): the critics' loss from each
critic's TD loss and CQL gap, with a fixed weight or the Lagrange form (docs/loss.md section 4)."""

import torch


def penalised_critic_loss(cfg, log_alpha_prime: torch.Tensor, td_losses: list, gaps: list) -> dict:
    """`loss_qvalue` (and, in the Lagrange form, `alpha_prime` and `loss_alpha_prime`), member by member."""
    w = cfg.cql_weight
    if not cfg.lagrange:
        return {"loss_qvalue": sum(td + w * gap for td, gap in zip(td_losses, gaps))}
    alpha_prime = torch.clamp(log_alpha_prime.exp(), max=1e6)
    return {"alpha_prime": alpha_prime,
            "loss_qvalue": sum(td + alpha_prime * w * (gap - cfg.lagrange_threshold) for td, gap in zip(td_losses, gaps)),
            "loss_alpha_prime": -sum(alpha_prime * w * (gap - cfg.lagrange_threshold) for gap in gaps) / len(gaps)}
