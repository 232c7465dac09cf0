package plugins

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal makes the kernel send SIGKILL to the plugin process
// when the OS thread that started it exits (prctl PR_SET_PDEATHSIG). Launch
// starts it from a thread that lives until the process is gone, so the
// signal comes only when the host process dies, even by SIGKILL.
func setParentDeathSignal(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
}
