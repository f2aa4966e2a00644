"""Online reinforcement learning (ppo, grpo, rloo): rollouts, advantages, KL control, rewards."""
