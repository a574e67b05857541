"""Statistics of models on a little data, for the data merge methods (fisher, regmean).

`examples` builds each model's (context, continuation) token pairs from lm-eval tasks,
`compute` runs the model over them (gradients for the Fisher, forward hooks for Gram matrices),
`cache` keeps the results on disk keyed by model weights, data and settings.
"""

from evomerge.data_stats.cache import StatisticsRequest, ensure_statistics, statistics_key
from evomerge.data_stats.compute import fisher_diagonal, gram_matrices

__all__ = ["StatisticsRequest", "ensure_statistics", "fisher_diagonal", "gram_matrices", "statistics_key"]
