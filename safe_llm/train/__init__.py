"""The training pieces SAFE, joint windows and recovery share."""
