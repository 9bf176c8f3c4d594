"""On-policy reinforcement learning on the interactivity benchmark's metrics
(`microturn train --rl`)."""
