"""`python -m prefrank.train …` (or `torchrun --nproc_per_node=N -m prefrank.train …`)."""

from prefrank.train.loop import main

if __name__ == "__main__":
    main()
