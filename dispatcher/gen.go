package dispatcher

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type xlb_flow -type xlb_vip -type xlb_service -type xlb_backend -type xlb_backend_stats -type xlb_nh -type xlb_conn -type xlb_rconn -type xlb_cfg -type xlb_pkt -type xlb_stage -type xlb_stat -type xlb_sel_mode -type xlb_conn_flag -type xlb_dir -type xlb_ct_state -type xlb_port_state -type xlb_vip_port xlb ../programs/xlb.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel floor ../programs/floor.c
