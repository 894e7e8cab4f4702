"""Token-based autoscaling: the policy (`policy`), its autoscaler_* metrics (`metrics`), the
local actuator behind `bisllm serve --autoscale` (`local`) and the trace simulator
(`simulate`)."""
