from llm_atc.cli import main

main()
