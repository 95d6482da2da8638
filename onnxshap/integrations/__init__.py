"""Integrations with engines that run explanations at scale (Ray Data); each imports its engine lazily."""
