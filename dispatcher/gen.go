package dispatcher

// The pipeline is built for amd64 only: the connection table's lock-free
// protocol (programs/include/xlb_ct.h) relies on x86-64's ordering of loads
// and stores. The include path holds vendored libbpf headers and the few
// asm/ headers the uapi headers need, so the build does not depend on the
// host's architecture include directory.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -I../programs/include" -target amd64 -type xlb_flow -type xlb_vip -type xlb_service -type xlb_backend -type xlb_backend_stats -type xlb_nh -type xlb_conn -type xlb_rconn -type xlb_conn_head -type xlb_rconn_head -type xlb_cfg -type xlb_pkt -type xlb_stage -type xlb_stat -type xlb_sel_mode -type xlb_conn_flag -type xlb_dir -type xlb_ct_state -type xlb_port_state -type xlb_vip_port -type xlb_rconn_flag -type xlb_syn_mode -type xlb_limit -type xlb_src_slot -type xlb_trusted -type xlb_traffic -type xlb_flow6 -type xlb_vip6 -type xlb_backend6 -type xlb_conn6 -type xlb_rconn6 -type xlb_vip_port6 -type xlb_src6_slot xlb ../programs/xlb.c
