"""Online RL pieces the ppo/grpo/rloo methods need: rollouts (rollout.py); advantages, KL control and reward
functions join here."""
