"""Distributed fine-tuning of gaze models on Ray Train with DeepSpeed ZeRO-3, tracked in MLflow."""
