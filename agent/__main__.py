"""`python -m agent` is `launch-agent`."""

from agent.daemon import main

main()
