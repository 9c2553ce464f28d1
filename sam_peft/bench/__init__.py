"""Reproduction harness: tasks × methods × seeds through the same training path as `sam-peft train`."""
