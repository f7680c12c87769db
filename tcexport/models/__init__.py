"""Model sources: specs (timm:, hf:, st:, py:), their loaders, the tiny zoo, seeded init and input specs."""
