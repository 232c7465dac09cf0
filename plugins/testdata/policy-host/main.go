// Command policy-host is a host for the parent-death test: it launches the
// policy plugin named by its argument, prints the plugin's pid, then keeps
// making OS threads exit (goroutines that lock their thread and return)
// until it is killed. The plugin must survive the thread exits and die with
// the host.
package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/xlb-project/xlb/plugins"
)

func main() {
	c, err := plugins.Launch(context.Background(), plugins.LaunchConfig{Path: os.Args[1]})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(c.Pid())
	for {
		done := make(chan struct{})
		go func() {
			runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
			close(done)
		}()
		<-done
		time.Sleep(10 * time.Millisecond)
	}
}
