"""``python -m flexsp.profile [hydra overrides]`` = ``flexsp-profile``."""
from flexsp.profile import main

if __name__ == "__main__":
    main()
