"""Pure tensor math of weight quantization: the grid, the group-weighted Hessian, the solver,
per-channel output statistics, per-group means and the multiple-choice knapsack. No I/O, no
hooks, no logging."""
