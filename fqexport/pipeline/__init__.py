"""The compress workflow: the layer loop around the solver, bias correction and BN re-estimation."""
