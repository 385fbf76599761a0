"""Real-kernel test infrastructure (see provision.sh, guest.py)."""
