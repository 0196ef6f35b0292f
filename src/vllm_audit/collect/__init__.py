"""Scale-out: `vllm-audit collect` verifies every replica's chain and stores it centrally."""
