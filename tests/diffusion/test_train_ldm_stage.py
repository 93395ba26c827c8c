"""What the train_ldm stage reports."""

from __future__ import annotations

from stages.train_ldm import summary_line, train_loss_metrics


def test_reported_training_loss_is_named_for_what_it_averages():
    log = [{"step": i, "loss": 1.0 if i < 50 else 0.5} for i in range(149)] + [{"step": 149, "loss": 0.25}]
    metrics = train_loss_metrics(log)
    mean = (99 * 0.5 + 0.25) / 100
    assert metrics == {"train_loss_last100_mean": mean}  # never a bare "final_loss"
    line = summary_line(900, 300, log, {**metrics, "val_loss_ema": 0.3, "val_loss_raw": 0.4})
    assert "last-step loss 0.2500" in line and f"mean of last 100 steps {mean:.4f}" in line
    assert "final loss" not in line
    assert train_loss_metrics(log[:10]) == {"train_loss_last100_mean": 1.0}  # a short run: all its steps
