"""Shares the baby corpus and the 20-step MAR checkpoint between the trainer and analysis tests."""

from tests.train.test_train import corpus, mar_ckpt  # noqa: F401
