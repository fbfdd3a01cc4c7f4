"""Classify stage: scikit-learn heads on cached features, selected on val, scored once on test."""
