"""What a process of the run takes from its host: the cores it runs on and the authenticated
rendezvous of its process groups (the weight group's and DeepSpeed's)."""
