"""The training pipeline behind ``bayesian-bits train``: options, data, optimisation, checkpoints and reports."""
