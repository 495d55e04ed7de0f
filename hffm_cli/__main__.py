from hffm_cli.main import main

main()
